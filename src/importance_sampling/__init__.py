"""Deep learning with importance sampling (Katharopoulos & Fleuret, ICML 2018) in PyTorch.

Four layers, each importing only the ones before it:

core/       the method, torch only: scores, sampling maths, samplers, exact gradient norms
engine/     the training loop and what it needs: datasets, models, budget, checkpoints, outputs
config/     Hydra: from a composed config to a Trainer (train.py, the scripts); launch helpers
analysis/   run directories -> tables and figures (pandas, matplotlib); imports no other layer

``import importance_sampling`` gives the core's public names and needs nothing but torch.
"""

from .core.grad_norms import GradNormRecorder, gradient_norm_scores
from .core.samplers import ImportanceSampler, Presample, Sampler, Selection, UniformSampler
from .core.sampling import (
    VarianceReductionSwitch,
    equivalent_batch_increment,
    importance_probabilities,
    resample,
)
from .core.scores import cross_entropy, loss_scores, upper_bound_scores

__all__ = [
    "GradNormRecorder",
    "ImportanceSampler",
    "Presample",
    "Sampler",
    "Selection",
    "UniformSampler",
    "VarianceReductionSwitch",
    "cross_entropy",
    "equivalent_batch_increment",
    "gradient_norm_scores",
    "importance_probabilities",
    "loss_scores",
    "resample",
    "upper_bound_scores",
]

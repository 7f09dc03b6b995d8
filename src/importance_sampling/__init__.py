"""Deep learning with importance sampling (Katharopoulos & Fleuret, ICML 2018) in PyTorch.

scores.py    per-sample importance: loss, upper bound, exact gradient norm
grad_norms.py  exact per-sample gradient norms from one ordinary backward (module hooks)
sampling.py  presample -> score -> resample -> weights; the tau switch; the samplers
data.py      datasets as tensors        models.py  the networks
trainer.py   the loop, timing, evaluation, metrics files
"""

from .grad_norms import GradNormRecorder
from .sampling import (
    Batch,
    ImportanceSampler,
    UniformSampler,
    VarianceReductionSwitch,
    equivalent_batch_increment,
    importance_probabilities,
    resample,
)
from .scores import cross_entropy, gradient_norm_scores, loss_scores, upper_bound_scores
from .trainer import METRICS_COLUMNS, Trainer

__all__ = [
    "METRICS_COLUMNS",
    "Batch",
    "GradNormRecorder",
    "ImportanceSampler",
    "Trainer",
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

"""Deep learning with importance sampling (Katharopoulos & Fleuret, ICML 2018) in PyTorch.

sampling.py    the maths: probabilities, resampling, weights, tau and its switch
samplers.py    which points to load and which to train on (uniform, loss, upper bound, gradient norm)
baselines.py   online batch selection, history, selective backprop, InfoBatch
scores.py      per-sample importance: loss, upper bound, exact gradient norm
grad_norms.py  exact per-sample gradient norms from one ordinary backward (module hooks)
data.py        datasets (tensors on the device, or streamed)   models.py  the networks
trainer.py     the loop; budget.py, runtime.py, sources.py, outputs.py, distributed.py its parts
builder.py     from a Hydra config to a Trainer (train.py, scripts, tests)
"""

from .grad_norms import GradNormRecorder
from .samplers import ImportanceSampler, Presample, Sampler, Selection, UniformSampler
from .sampling import (
    VarianceReductionSwitch,
    equivalent_batch_increment,
    importance_probabilities,
    resample,
)
from .scores import cross_entropy, gradient_norm_scores, loss_scores, upper_bound_scores

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

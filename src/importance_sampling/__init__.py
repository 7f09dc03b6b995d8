"""Deep learning with importance sampling (Katharopoulos & Fleuret, ICML 2018) in PyTorch.

Four layers, each importing only the ones before it:

core/       the method, torch only: scores, sampling maths, samplers, exact gradient norms
engine/     the training loop and what it needs: datasets, models, budget, checkpoints, outputs
config/     Hydra: from a composed config to a Trainer (train.py, the scripts); launch helpers
analysis/   run directories -> tables and figures (pandas, matplotlib); imports no other layer

``import importance_sampling`` gives the core's public names and needs nothing but torch; they are
imported on first use, so that the analysis layer (``importance_sampling.analysis``) loads without
torch.
"""

import importlib

# public name -> the core module that defines it
_WHERE = {
    "GradNormRecorder": "grad_norms",
    "gradient_norm_scores": "grad_norms",
    "ImportanceSampler": "samplers",
    "Presample": "samplers",
    "Sampler": "samplers",
    "Selection": "samplers",
    "UniformSampler": "samplers",
    "VarianceReductionSwitch": "sampling",
    "equivalent_batch_increment": "sampling",
    "importance_probabilities": "sampling",
    "resample": "sampling",
    "cross_entropy": "scores",
    "loss_scores": "scores",
    "upper_bound_scores": "scores",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".core.{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

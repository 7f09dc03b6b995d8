"""What each sampler does to the gradient, measured exactly
(docs/method.md#variance-reduction-measured-exactly).

On a fixed presample U of B points with per-sample gradients v_i, a sampling distribution q over
U and weights w_i = 1/(B q_i), the minibatch estimator (1/b) sum_k w_{I_k} v_{I_k} (b draws with
replacement) is unbiased for mean_i v_i, and

    Tr Cov = (1/b) * ( sum_i q_i w_i^2 ||v_i||^2 - ||mean_i v_i||^2 ).

It needs only ||v_i||^2 (B,) and ||mean_i v_i||^2: the squared norms come from one ordinary backward
per chunk (grad_norms.py, closed forms per layer), the mean gradient from the same backward, so no
per-sample gradient is ever formed. From Tr Cov under q = uniform, loss, upper_bound and
gradient_norm (the optimum) come:

- ``variance_ratio``      Tr Cov_q / Tr Cov_uniform (1 = no change; lower is better). A score
                          that is exactly 0 for a point with a non-zero gradient (a float32 loss
                          of a confidently right sample) never draws it: that estimator is biased,
                          and its squared bias is added (``bias_sq``, the mean squared error);
- ``variance_reduction``  1 - variance_ratio, the share of uniform's variance removed
                          ((Tr V_u - Tr V_g) / Tr V_u in docs/method.md);
- ``tau_measured``        Tr Cov_uniform / Tr Cov_q: uniform sampling needs a batch this many
                          times larger for the same variance, i.e. the equivalent batch increment
                          that tau estimates. ``tau_hat`` = B sum_i q_i^2 is the trainer's cheap
                          estimate of it (variance units), computed here from the same q.

and how close each score's distribution is to the gradient-norm one: total variation and L2
distance between the normalised scores, and Spearman rank correlation of the scores.

The training engine's ``VarianceCallback`` (importance_sampling.engine.variance) takes these
measurements during training and writes ``variance.csv``, one row per measurement point and
score (columns: ``VARIANCE_COLUMNS``); importance_sampling.analysis.variance reads and plots it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .grad_norms import GradNormRecorder
from .sampling import equivalent_batch_increment, importance_probabilities
from .scores import LossFn, cross_entropy, loss_scores, upper_bound_scores

DISTRIBUTIONS = ("uniform", "loss", "upper_bound", "gradient_norm")

VARIANCE_COLUMNS = (
    "step",  # optimizer steps when measured
    "epoch",  # passes over the training set when measured
    "train_time",  # the trainer's train_time when measured (seconds)
    "score",  # the sampling distribution: uniform | loss | upper_bound | gradient_norm
    "presample_size",  # B, points of the fixed presample
    "batch_size",  # b, draws per minibatch
    "trace_cov",  # exact Tr Cov of the weighted minibatch gradient estimator
    "bias_sq",  # ||bias||^2 of the estimator: 0 unless a non-zero gradient has q_i = 0
    "zero_prob",  # presample points with q_i = 0 (never drawn)
    "variance_ratio",  # (trace_cov + bias_sq) / trace_cov of uniform (lower is better)
    "variance_reduction",  # 1 - variance_ratio
    "tau_measured",  # trace_cov of uniform / trace_cov: the equivalent batch increment achieved
    "tau_hat",  # B sum_i q_i^2: the trainer's estimate of it from q alone (variance units)
    "trainer_tau",  # the trainer's moving average of tau (its sampler's score and tau_kind)
    "tv_distance",  # total variation distance of q to the gradient-norm distribution
    "l2_distance",  # L2 distance of q to the gradient-norm distribution
    "spearman",  # rank correlation of the scores with the gradient norms (nan: uniform)
    "mean_grad_sq",  # ||mean_i v_i||^2, the squared norm of the presample's mean gradient
)


# ------------------------------------------------------------------ the maths
def trace_covariance(
    sq_norms: Tensor, mean_grad_sq: Tensor | float, probs: Tensor, batch_size: int
) -> Tensor:
    """Exact Tr Cov of (1/b) sum_k w_{I_k} v_{I_k}, I_k ~ probs i.i.d., w_i = 1/(B probs_i), as
    in docs/method.md: valid when every non-zero gradient has probability > 0 (the estimator is then
    unbiased; ``estimator_error`` covers the other case).

    Args:
        sq_norms: ||v_i||^2, shape (B,).
        mean_grad_sq: ||(1/B) sum_i v_i||^2 (a number or 0-dim tensor).
        probs: the sampling distribution q over the presample, shape (B,), sums to 1.
        batch_size: b.
    Returns a 0-dim float64 tensor: (1/b)(sum_i ||v_i||^2 / (B^2 q_i) - ||mean_i v_i||^2); a
    point with q_i = 0 contributes nothing if v_i = 0, and makes it inf otherwise.
    """
    sq_norms, probs = sq_norms.double(), probs.double()
    positive = probs > 0
    if (sq_norms[~positive] > 0).any():
        return torch.tensor(math.inf, dtype=torch.float64)
    return (
        _second_moment(sq_norms, probs) - torch.as_tensor(mean_grad_sq, dtype=torch.float64)
    ) / batch_size


def _second_moment(sq_norms: Tensor, probs: Tensor) -> Tensor:
    """sum over q_i > 0 of q_i w_i^2 ||v_i||^2 = ||v_i||^2 / (B^2 q_i)."""
    n, positive = len(probs), probs > 0
    return (sq_norms[positive] / (n * n * probs[positive])).sum()


def estimator_error(
    sq_norms: Tensor, mean_grad: Tensor, excluded_mean: Tensor, probs: Tensor, batch_size: int
) -> tuple[float, float]:
    """(Tr Cov, ||bias||^2) of the same estimator when some points may have q_i = 0.

    Such points are never drawn (float32 losses of confidently right samples round to exactly 0,
    so the loss sampler does this), so the estimator's mean is mean_grad - excluded_mean, with
    ``excluded_mean`` = (1/B) sum_{q_i = 0} v_i (P,), and its mean squared error around the true
    mean gradient is Tr Cov + ||excluded_mean||^2. With no excluded point this is
    ``trace_covariance`` and a zero bias.
    """
    sq_norms, probs = sq_norms.double(), probs.double()
    own_mean_sq = (mean_grad.double() - excluded_mean.double()).pow(2).sum()
    trace = (_second_moment(sq_norms, probs) - own_mean_sq) / batch_size
    return trace.item(), excluded_mean.double().pow(2).sum().item()


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two score vectors (n,), ties given their average rank;
    nan when either is constant."""
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denom if denom > 0 else math.nan


def _average_ranks(x: Tensor) -> Tensor:
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank (from 0) of each distinct value's first copy
    return (first + (counts - 1) / 2)[inverse].double()


def gradient_statistics(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = cross_entropy,
    chunk_size: int = 128,
    masks: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """What the estimator's error needs, exactly, without forming per-sample gradients, float64:
    ||v_i||^2 (B,), mean_i v_i (P,), and (1/B) sum_{i in mask} v_i (P,) for each boolean ``mask``
    (B,), with v_i = grad_theta L_i over the trainable parameters (flattened in
    ``named_parameters`` order).

    Per chunk of ``chunk_size`` points: one forward, one backward of sum_i L_i that gives both the
    per-sample squared norms (``grad_norms.GradNormRecorder``) and the chunk's gradient sum, and
    one more backward of sum_{i in mask} L_i for each mask that selects a point of the chunk.
    Memory: one chunk's activations; no parameter's .grad is touched."""
    model = getattr(model, "_orig_mod", model)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = params[0].dtype
    recorder = GradNormRecorder(model)
    sq_norms = []
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=inputs.device)
    masked = [torch.zeros_like(total) for _ in masks]
    no_autocast = torch.autocast(inputs.device.type, enabled=False)  # the exact measurement
    with torch.enable_grad(), torch.inference_mode(False), no_autocast:
        for i in range(0, len(inputs), chunk_size):
            x, y = inputs[i : i + chunk_size], targets[i : i + chunk_size]
            x = x.detach().to(dtype) if x.is_floating_point() else x
            x, y = (x.clone() if x.is_inference() else x), (y.clone() if y.is_inference() else y)
            with recorder:
                losses = loss_fn(model(x), y)
            chunk_masks = [m[i : i + chunk_size] for m in masks]
            keep = any(bool(m.any()) for m in chunk_masks)
            grads = torch.autograd.grad(losses.sum(), params, retain_graph=keep)
            sq_norms.append(recorder.squared_norms().double())
            total += _flat(grads)
            for k, m in enumerate(chunk_masks):
                if m.any():
                    grads = torch.autograd.grad(losses[m].sum(), params, retain_graph=True)
                    masked[k] += _flat(grads)
    n = len(inputs)
    return torch.cat(sq_norms), total / n, [m / n for m in masked]


def _flat(grads: Sequence[Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in grads]).double()


def measure(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
    loss_fn: LossFn = cross_entropy,
    smoothing: float = 0.0,
    chunk_size: int = 128,
) -> list[dict]:
    """Every sampler's distribution on one presample (``inputs`` (B, ...), ``targets`` (B,)),
    with the model in eval mode: one dict per distribution (keys: the measured columns of
    ``VARIANCE_COLUMNS``). ``smoothing`` is added to the loss and upper-bound scores, as the
    sampler does; the gradient-norm distribution is the exact optimum, unsmoothed."""
    was_training = model.training
    model.eval()  # BatchNorm in train mode would mix the samples of a chunk
    try:
        with torch.no_grad():
            logits = torch.cat(
                [model(inputs[i : i + chunk_size]) for i in range(0, len(inputs), chunk_size)]
            )
        scores = {
            "uniform": torch.ones(len(inputs), dtype=torch.float64, device=inputs.device),
            "loss": loss_scores(logits, targets, loss_fn).double() + smoothing,
            "upper_bound": upper_bound_scores(logits, targets, loss_fn).double() + smoothing,
        }
        probs = {name: importance_probabilities(s).double() for name, s in scores.items()}
        scored = list(probs)
        sq_norms, mean_grad, excluded = gradient_statistics(
            model, inputs, targets, loss_fn, chunk_size, [probs[name] == 0 for name in scored]
        )
    finally:
        model.train(was_training)
    excluded = dict(zip(scored, excluded, strict=True))
    scores["gradient_norm"] = grad_norms = sq_norms.sqrt()
    # the optimum: its support is exactly the non-zero gradients, so it is unbiased
    probs["gradient_norm"] = optimal = importance_probabilities(grad_norms).double()
    excluded["gradient_norm"] = torch.zeros_like(mean_grad)
    rows = []
    for name in DISTRIBUTIONS:
        q = probs[name]
        trace, bias_sq = estimator_error(sq_norms, mean_grad, excluded[name], q, batch_size)
        rows.append(
            {
                "score": name,
                "presample_size": len(inputs),
                "batch_size": batch_size,
                "trace_cov": trace,
                "bias_sq": bias_sq,
                "zero_prob": int((q == 0).sum()),
                "tau_hat": equivalent_batch_increment(q).item(),
                "tv_distance": 0.5 * (q - optimal).abs().sum().item(),
                "l2_distance": (q - optimal).norm().item(),
                "spearman": math.nan
                if name == "uniform"
                else rank_correlation(scores[name], grad_norms),
                "mean_grad_sq": mean_grad.pow(2).sum().item(),
            }
        )
    uniform_error = rows[0]["trace_cov"]  # uniform is unbiased
    for r in rows:
        ratio = (r["trace_cov"] + r["bias_sq"]) / uniform_error if uniform_error > 0 else math.nan
        r.update(
            variance_ratio=ratio,
            variance_reduction=1.0 - ratio,
            tau_measured=1.0 / ratio if ratio > 0 else math.nan,
        )
    return rows

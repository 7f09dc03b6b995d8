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

``VarianceCallback`` takes these measurements during training (``Trainer`` callback) and writes
``variance.csv`` in the run directory, one row per measurement point and score
(columns: ``VARIANCE_COLUMNS``).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .grad_norms import GradNormRecorder
from .sampling import equivalent_batch_increment, importance_probabilities
from .scores import LossFn, cross_entropy, loss_scores, upper_bound_scores
from .trainer import Callback, Trainer

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


# ------------------------------------------------------------------ during training
class VarianceCallback(Callback):
    """Measure every ``every_rows`` metrics rows (the first row, before training, included, and the
    final state when the run completes) on a fixed presample drawn once with ``seed``.

    Args:
        every_rows: measure at rows 0, every_rows, 2 every_rows, ... of metrics.csv.
        presample_size: B; None = the trainer's sampler's presample size (3 b for uniform).
        batch_size: b; None = the trainer's sampler's batch size.
        seed: seeds the choice of the presample (the same points at every measurement).
        chunk_size: gradients computed this many points at a time (one forward + backward each).
        filename: written in the trainer's out_dir.
    """

    def __init__(
        self,
        every_rows: int = 1,
        presample_size: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        chunk_size: int = 128,
        filename: str = "variance.csv",
    ):
        if every_rows < 1:
            raise ValueError(f"variance.every_rows must be >= 1 to measure, got {every_rows}")
        self.every_rows, self.seed, self.chunk_size = int(every_rows), int(seed), int(chunk_size)
        self.presample_size, self.batch_size, self.filename = presample_size, batch_size, filename
        self.presample: Tensor | None = None
        self.rows: list[dict] = []  # every measurement so far, as written (e.g. for a logger)
        self.measured_steps: list[int] = []

    def _setup(self, trainer: Trainer) -> None:
        sampler, n = trainer.sampler, trainer.num_samples
        self.batch_size = int(self.batch_size or sampler.batch_size)
        size = int(
            self.presample_size or getattr(sampler, "presample_size", 3 * sampler.batch_size)
        )
        if size > n:  # a measurement should never stop a training run: measure all the data
            warnings.warn(
                f"variance.presample_size={size} is larger than the training set ({n}); "
                f"measuring on all {n} points",
                stacklevel=2,
            )
            size = n
        generator = torch.Generator().manual_seed(self.seed)
        self.presample = torch.randperm(n, generator=generator)[:size]
        self.path = Path(trainer.out_dir) / self.filename
        # A resumed run (first row seen is not the run's first) keeps the measurements up to the
        # checkpoint's last row; later ones are redone, as the trainer redoes its metrics rows.
        kept = []
        if len(trainer.rows) > 1 and self.path.is_file():
            resumed_through = trainer.rows[-2]["step"]
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resumed_through]
            self.measured_steps = sorted({int(r["step"]) for r in kept})
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=VARIANCE_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def measure(self, trainer: Trainer) -> list[dict]:
        """Measure now and append the rows to the file."""
        if self.presample is None:
            self._setup(trainer)
        x, y = trainer.source.eval_inputs(self.presample)
        rows = measure(
            trainer.model,
            x,
            y,
            self.batch_size,
            trainer.loss_fn,
            getattr(trainer.sampler, "smoothing", 0.0),
            self.chunk_size,
        )
        when = {
            "step": trainer.step,
            "epoch": trainer.samples / trainer.num_samples,
            "train_time": trainer.train_time,
            "trainer_tau": trainer.sampler.tau,
        }
        rows = [{**when, **r} for r in rows]
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=VARIANCE_COLUMNS).writerows(rows)
        self.measured_steps.append(trainer.step)
        self.rows += rows
        return rows

    def on_row(self, trainer: Trainer, row: dict) -> None:
        # the row's index in metrics.csv (the trainer appends it before calling back)
        if (len(trainer.rows) - 1) % self.every_rows == 0:
            self.measure(trainer)

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        if summary["status"] == "completed" and trainer.step not in self.measured_steps:
            self.measure(trainer)


# ------------------------------------------------------------------ analysis of variance.csv
def read_variance(run_dir: str | Path):
    """``run_dir/variance.csv`` as a pandas DataFrame."""
    import pandas as pd

    return pd.read_csv(Path(run_dir) / "variance.csv")


def ordering_by_step(table):
    """Per measurement point (index: step), whether the paper's orderings hold: ``variance``
    (gradient_norm >= upper_bound > loss > uniform in variance reduction) and ``distance`` (the
    upper bound closer than the loss to the gradient-norm distribution, in TV distance)."""
    wide = table.pivot_table(
        index="step", columns="score", values=["variance_reduction", "tv_distance"]
    )
    vr, tv = wide["variance_reduction"], wide["tv_distance"]
    variance = (
        (vr.gradient_norm >= vr.upper_bound - 1e-12)
        & (vr.upper_bound > vr.loss)
        & (vr.loss > vr.uniform)
    )
    return variance.to_frame("variance").assign(distance=tv.upper_bound < tv.loss)


def ordering_holds(table) -> dict:
    """The share of measurement points where each of the paper's orderings holds (see
    ``ordering_by_step``), and ``points``, the number of measurement points."""
    by_step = ordering_by_step(table)
    return {
        "points": len(by_step),
        "variance": float(by_step.variance.mean()),
        "distance": float(by_step.distance.mean()),
    }


def summarize(table):
    """Per score: the median over measurement points of the measured quantities."""
    columns = [
        "variance_reduction",
        "tau_measured",
        "tau_hat",
        "tv_distance",
        "l2_distance",
        "spearman",
    ]
    return table.groupby("score", sort=False)[columns].median().reindex(list(DISTRIBUTIONS))


def plot_variance(table, title: str = ""):
    """Four panels over training steps: variance reduction of each score, its TV distance and
    rank correlation to the gradient-norm distribution, and tau (measured vs estimated). Each
    score keeps its colour, line style and marker (styles.py). Returns the figure."""
    import matplotlib.pyplot as plt

    from .styles import plain_log_ticks, sampler_style

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained")
    (ax_vr, ax_tv), (ax_rank, ax_tau) = axes
    by_score = {name: g.sort_values("step") for name, g in table.groupby("score")}
    span = float(table.step.max() - table.step.min()) or 1.0

    def line(ax, name: str, y, offset: float = 0.0, **kwargs) -> None:
        g = by_score[name]
        style = {**sampler_style(name), "ms": 5, "lw": 1.6, **kwargs}
        ax.plot(g.step + offset * span, y(g), **style)

    for name in DISTRIBUTIONS:
        if name in by_score:
            line(ax_vr, name, lambda g: g.variance_reduction, label=name)
    ax_vr.set(xlabel="step", ylabel="variance reduction  1 - TrCov_q / TrCov_uniform")
    for name in ("uniform", "loss", "upper_bound"):
        if name in by_score:
            line(ax_tv, name, lambda g: g.tv_distance, label=name)
    ax_tv.set(xlabel="step", ylabel="TV distance to the gradient-norm distribution")
    # Both rank correlations sit near 1 after the first steps: 1 - rho on a log axis separates
    # them, and the loss's markers are hollow and nudged sideways so neither hides the other.
    for name, offset, hollow in (("loss", -0.006, True), ("upper_bound", 0.006, False)):
        if name in by_score:
            line(
                ax_rank,
                name,
                lambda g: (1 - g.spearman).clip(lower=1e-6),
                offset,
                label=name,
                **({"mfc": "white"} if hollow else {}),
            )
    ax_rank.set(
        xlabel="step",
        ylabel="1 - Spearman rank correlation with the gradient norm",
        yscale="log",
    )
    ax_rank.set_title("lower = ranks points more like the gradient norm", fontsize=9, loc="right")
    plain_log_ticks(ax_rank)
    for name in ("loss", "upper_bound", "gradient_norm"):
        if name in by_score:
            line(
                ax_tau, name, lambda g: g.tau_measured, label=f"{name}: measured TrCov_u / TrCov_q"
            )
            line(
                ax_tau,
                name,
                lambda g: g.tau_hat,
                marker="",
                linestyle=(0, (2, 2)),
                lw=1.2,
                label=f"{name}: tau_hat = B sum q^2",
            )
    g = by_score.get("uniform", table)
    tau = g.trainer_tau.where(g.trainer_tau > 0)  # 0 before the first step (Algorithm 1)
    ax_tau.plot(
        g.step, tau, color="black", linestyle=":", lw=1.6, label="trainer's tau (moving average)"
    )
    ax_tau.set(xlabel="step", ylabel="equivalent batch increment tau", yscale="log")
    plain_log_ticks(ax_tau)
    for ax in axes.ravel():
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8 if ax is not ax_tau else 7, handlelength=3.5)
    if title:
        fig.suptitle(title)
    return fig

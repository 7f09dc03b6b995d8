"""Presample -> score -> resample -> weights, and the tau switch (docs/method.md#algorithm-1).

The pieces compose, so they drop into any training loop::

    probs = importance_probabilities(scores)                 # g_i = G_i / sum_j G_j over U
    positions, weights = resample(probs, batch_size)          # b draws from U, w_i = 1/(B g_i)
    loss = (weights * per_sample_loss[positions]).mean()      # unbiased for the mean over U
    switch.update(equivalent_batch_increment(probs))          # tau <- a tau + (1 - a) tau_hat

``UniformSampler`` and ``ImportanceSampler`` wrap them for ``Trainer``: ``sample()`` picks the
indices and weights of the next step, ``observe()`` sees the step's forward pass.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .scores import LossFn, gradient_norm_scores, loss_scores, upper_bound_scores

SCORES = ("loss", "upper_bound", "gradient_norm")
TauKind = Literal["variance", "std"]


class NonFiniteScoresError(ValueError):
    """Raised when a score is NaN or infinite: the model has diverged, sampling is meaningless."""


def importance_probabilities(scores: Tensor, smoothing: float = 0.0, check: bool = True) -> Tensor:
    """Normalised sampling distribution g over a presample, shape (B,) -> (B,).

    g_i = (s_i + smoothing) / sum_j (s_j + smoothing). Scores that are all zero fall back to the
    uniform distribution (every weight is then 1). Non-finite or negative scores raise, which
    costs one host synchronisation; ``check=False`` skips the check and never synchronises
    (non-finite scores then give non-finite probabilities: not for drawing from).
    """
    scores = scores.float() + smoothing
    if not check:
        total = scores.sum()
        return torch.where(total == 0, 1.0 / len(scores), scores / total)  # NaN stays NaN
    total, lowest = (
        float(v) for v in torch.stack([scores.sum(), scores.min()]).tolist()
    )  # one sync
    if not math.isfinite(total):
        bad = (~torch.isfinite(scores)).sum().item()
        raise NonFiniteScoresError(f"{bad} of {len(scores)} importance scores are NaN or infinite")
    if lowest < 0:
        raise ValueError("importance scores must be non-negative")
    if total <= 0:
        return torch.full_like(scores, 1.0 / len(scores))
    return scores / total


def resample(
    probs: Tensor, batch_size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw ``batch_size`` positions of the presample with replacement, P(i) = probs_i.

    Returns (positions (b,), weights (b,)) with w_i = 1 / (B probs_i), so that
    E[(1/b) sum_k w_k v_k] = (1/B) sum_i v_i for any per-sample quantity v (e.g. a gradient).
    """
    positions = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
    return positions, importance_weights(probs, positions)


def importance_weights(probs: Tensor, positions: Tensor) -> Tensor:
    """w_i = 1 / (B probs_i) for the drawn ``positions`` (b,) of a presample of size B = len(probs)."""
    return 1.0 / (len(probs) * probs[positions])


def equivalent_batch_increment(probs: Tensor, kind: TauKind = "variance") -> Tensor:
    """tau_hat (docs/method.md): importance sampling with batch b ~ uniform with batch tau*b.

    ``variance``: 1/tau = 1 - ||g - u||^2 / ||g||^2, which simplifies to tau = B * sum_i g_i^2
    (in units of batch size, i.e. of gradient variance; 1 for uniform g; B for a one-hot g).
    ``std``: its square root, the official Keras code's quantity (units of standard deviation).
    Returns a 0-dim tensor (no host synchronisation).
    """
    tau = len(probs) * probs.float().pow(2).sum()
    return tau.sqrt() if kind == "std" else tau


def default_tau_threshold(batch_size: int, presample_size: int) -> float:
    """tau_th = (B + 3b) / (3b): the cost of an importance step over a uniform one, taking a
    backward pass as twice a forward pass (docs/method.md#the-threshold)."""
    return (presample_size + 3 * batch_size) / (3 * batch_size)


class VarianceReductionSwitch:
    """Exponential moving average of tau_hat; importance sampling is on while tau > threshold.

    ``update`` takes tau_hat as a float or as a 0-dim tensor on the device; a tensor is folded in
    without a host synchronisation, which then happens once, when ``on`` or ``tau`` is next read
    (at the start of the next step rather than between the forward and the backward pass)."""

    def __init__(self, threshold: float, momentum: float = 0.9):
        self.threshold = float(threshold)
        self.momentum = float(momentum)
        self._tau: float | Tensor = 0.0  # Algorithm 1 starts with tau = 0: first steps uniform

    @property
    def tau(self) -> float:
        if isinstance(self._tau, Tensor):
            self._tau = float(self._tau)
            if not math.isfinite(self._tau):
                raise NonFiniteScoresError(f"tau is {self._tau}: the last scores were not finite")
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau = float(value)

    @property
    def on(self) -> bool:
        return self.tau > self.threshold

    def update(self, tau_hat: float | Tensor) -> None:
        self._tau = self.momentum * self._tau + (1.0 - self.momentum) * tau_hat

    def state_dict(self) -> dict:
        return {"tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.tau = state["tau"]


class IndexStream:
    """Uniform draws without replacement within an epoch: consecutive slices of a shuffled
    permutation, reshuffled when exhausted (what a shuffling DataLoader does, on the device)."""

    def __init__(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu"):
        self.n, self.generator, self.device = n, generator, torch.device(device)
        self._perm = self._shuffle()
        self._cursor = 0

    def _shuffle(self) -> Tensor:
        return torch.randperm(self.n, generator=self.generator, device=self.device)

    def take(self, k: int) -> Tensor:
        if k > self.n:
            raise ValueError(f"cannot draw {k} distinct samples from a dataset of {self.n}")
        if self._cursor + k > self.n:
            self._perm, self._cursor = self._shuffle(), 0
        out = self._perm[self._cursor : self._cursor + k]
        self._cursor += k
        return out

    def state_dict(self) -> dict:
        return {"perm": self._perm, "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        self._perm, self._cursor = state["perm"].to(self.device), int(state["cursor"])


@dataclass
class Batch:
    """What one training step uses: dataset indices (b,), loss weights (b,) or None for all-ones,
    whether it came from importance sampling, and the inputs (b, ...) when the sampler already
    fetched them (an augmented presample is scored and trained on as the same views)."""

    indices: Tensor
    weights: Tensor | None = None
    importance: bool = False
    inputs: Tensor | None = None


Inputs = Tensor | Callable[[Tensor], Tensor]


def fetch(inputs: Inputs, indices: Tensor) -> Tensor:
    """``inputs[indices]`` for a tensor; ``inputs(indices)`` for a fetch function (which may, for
    instance, gather and augment on the device)."""
    return inputs(indices) if callable(inputs) else inputs[indices]


class Sampler:
    """Common part of the samplers: the batch size b and a uniform index stream over the data."""

    name = "sampler"
    scored = 0  # points scored by presample forwards so far
    fallbacks = 0  # importance steps whose scores were all equal or all zero (a uniform step)
    progress = 0.0  # fraction of the run's budget used; the trainer sets it before every step

    def __init__(self, batch_size: int = 128):
        if batch_size < 1:
            raise ValueError(f"sampler.batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)

    def setup(self, num_samples: int, generator: torch.Generator, device: torch.device) -> None:
        """Bind to a training set of ``num_samples`` points kept on ``device``."""
        if self.batch_size > num_samples:
            raise ValueError(
                f"sampler.batch_size={self.batch_size} is larger than the training set "
                f"({num_samples} samples)"
            )
        self.generator = generator
        self.stream = IndexStream(num_samples, generator, device)

    @property
    def tau(self) -> float:
        return float("nan")  # no variance estimate

    def sample(self, model: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn) -> Batch:
        """Indices and weights of the next step. ``inputs``: the training inputs, as a tensor or
        as a function from indices to inputs; ``targets``: all training targets."""
        return Batch(self.stream.take(self.batch_size))

    def observe(
        self,
        batch: Batch,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        logits: Tensor,
        loss_fn: LossFn,
    ) -> None:
        """See the step's forward pass (``inputs``, ``targets``, ``logits``: the batch's)."""

    def metrics(self) -> dict[str, float]:
        """Extra columns for metrics.csv (the same keys at every row of a run)."""
        return {}

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])


class UniformSampler(Sampler):
    """Plain SGD minibatches of ``batch_size`` points (p_i = 1/N, w_i = 1). ``presample_size`` is
    accepted and unused, so that one experiment preset can set B for every sampler."""

    name = "uniform"

    def __init__(self, batch_size: int = 128, presample_size: int | None = None):
        super().__init__(batch_size)


class ImportanceSampler(Sampler):
    """Algorithm 1 of the paper with a choice of score.

    Args:
        score: ``loss``, ``upper_bound`` or ``gradient_norm`` (see scores.py).
        batch_size: b, points per SGD step.
        presample_size: B, points scored per importance step; None = 3 b (the official default).
        tau_threshold: tau_th; None = (B + 3b) / (3b), the cost ratio of the two kinds of step
            when a backward costs two forwards; ``auto`` = the *measured* cost ratio
            (t_uniform_step + t_scoring_forward) / t_uniform_step, re-estimated during the run
            (medians of the last ``AUTO_WINDOW`` timings; a timed scoring probe provides the first
            scoring time). Logged as the ``tau_threshold``, ``cost_step_ms``, ``cost_score_ms`` columns.
        tau_momentum: a_tau of the moving average of tau_hat.
        tau_kind: ``variance`` (tau = B sum g^2, docs/method.md) or ``std`` (its square root, as in
            the official code); the default threshold is the same for both.
        smoothing: constant added to every score before normalising (0 = the paper's rule).
        score_chunk_size: points per forward (or per vmap chunk for gradient_norm) when scoring.
    """

    def __init__(
        self,
        score: str = "upper_bound",
        batch_size: int = 128,
        presample_size: int | None = None,
        tau_threshold: float | str | None = None,
        tau_momentum: float = 0.9,
        tau_kind: TauKind = "variance",
        smoothing: float = 0.0,
        score_chunk_size: int = 1024,
    ):
        super().__init__(batch_size)
        if score not in SCORES:
            raise ValueError(f"sampler.score={score!r} is not one of {', '.join(SCORES)}")
        self.name = self.score = score
        self.presample_size = int(presample_size or 3 * self.batch_size)
        if self.presample_size < self.batch_size:
            raise ValueError(
                f"sampler.presample_size (B={self.presample_size}) must be >= sampler.batch_size "
                f"(b={self.batch_size})"
            )
        self.auto_threshold = tau_threshold == "auto"
        if tau_threshold is None or self.auto_threshold:
            tau_threshold = default_tau_threshold(self.batch_size, self.presample_size)
        if not isinstance(tau_threshold, int | float) or tau_threshold < 1:
            raise ValueError(
                f"sampler.tau_threshold must be >= 1 (tau is 1 for uniform scores), got {tau_threshold}"
            )
        if not 0 <= tau_momentum < 1:
            raise ValueError(f"sampler.tau_momentum must be in [0, 1), got {tau_momentum}")
        if tau_kind not in ("variance", "std"):
            raise ValueError(f"sampler.tau_kind={tau_kind!r} is not one of variance, std")
        if smoothing < 0:
            raise ValueError(f"sampler.smoothing must be >= 0, got {smoothing}")
        self.tau_kind = tau_kind
        self.smoothing = float(smoothing)
        self.score_chunk_size = int(score_chunk_size)
        self.switch = VarianceReductionSwitch(tau_threshold, tau_momentum)
        self.step_times: list[float] = []  # seconds between sample() calls of uniform steps (auto)
        self.score_times: list[float] = []  # seconds of scoring forwards over B points (auto)
        self._last_call: float | None = None
        self._last_was_uniform = False

    @property
    def tau(self) -> float:
        return self.switch.tau

    def setup(self, num_samples: int, generator: torch.Generator, device: torch.device) -> None:
        super().setup(num_samples, generator, device)
        if self.presample_size > num_samples:
            raise ValueError(
                f"sampler.presample_size={self.presample_size} is larger than the training set "
                f"({num_samples} samples)"
            )

    def scores(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        logits: Tensor | None = None,
    ) -> Tensor:
        """Scores of a set of points, shape (n,). ``logits`` from a forward already done are reused
        by the loss and upper-bound scores; otherwise one forward pass (eval mode, no autograd)."""
        if self.score == "gradient_norm":
            with _eval_mode(model):
                return gradient_norm_scores(model, inputs, targets, loss_fn, self.score_chunk_size)
        if logits is None:
            with _eval_mode(model), torch.inference_mode():
                logits = torch.cat(
                    [
                        model(inputs[i : i + self.score_chunk_size])
                        for i in range(0, len(inputs), self.score_chunk_size)
                    ]
                )
        fn = loss_scores if self.score == "loss" else upper_bound_scores
        return fn(logits, targets, loss_fn)

    def sample(self, model: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn) -> Batch:
        if self.auto_threshold:
            self._measure_costs(model, inputs, targets, loss_fn)
        self._last_was_uniform = not self.switch.on
        if not self.switch.on:
            return Batch(self.stream.take(self.batch_size))
        presample = self.stream.take(self.presample_size)
        x = fetch(inputs, presample)
        start = time.perf_counter()
        scores = self.scores(model, x, targets[presample], loss_fn)
        if self.auto_threshold:
            self._record(self.score_times, start, scores)
        self.scored += len(presample)
        return self.draw(presample, scores, x)

    def distribution(self, scores: Tensor, check: bool = True) -> Tensor:
        """The sampling distribution g over a set of scored points, shape (n,) -> (n,)
        (``check``: see importance_probabilities)."""
        return importance_probabilities(scores, self.smoothing, check)

    def draw(self, presample: Tensor, scores: Tensor, inputs: Tensor | None = None) -> Batch:
        """Resample b of the scored presample, weight them, update tau (Algorithm 1, 7-9 and 17)."""
        probs = self.distribution(scores)
        tau_hat = float(equivalent_batch_increment(probs, self.tau_kind))
        self.switch.update(tau_hat)
        if tau_hat <= 1 + 1e-6:  # all scores equal (or all zero): this is a uniform step
            self.fallbacks += 1
        positions, weights = resample(probs, self.batch_size, self.generator)
        x = None if inputs is None else inputs[positions]
        return Batch(presample[positions], weights, importance=True, inputs=x)

    def update_tau(self, scores: Tensor) -> None:
        """tau_hat from the scores of a uniform batch (Algorithm 1, line 15), without a host
        synchronisation (the switch reads it at the next step; a non-finite loss is caught by the
        trainer's finiteness check)."""
        probs = self.distribution(scores, check=False)
        self.switch.update(equivalent_batch_increment(probs, self.tau_kind))

    def observe(
        self,
        batch: Batch,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        logits: Tensor,
        loss_fn: LossFn,
    ) -> None:
        """After a uniform step, its own b points give the next tau_hat (Algorithm 1, line 15)."""
        if batch.importance:
            return
        self.update_tau(self.scores(model, inputs, targets, loss_fn, logits=logits))

    # ------------------------------------------------------------ tau_threshold: auto
    AUTO_WINDOW = 20

    def _record(self, times: list[float], start: float, result: Tensor | None = None) -> None:
        """Append the seconds since ``start`` (after the GPU finished ``result``) to ``times``."""
        if result is not None and result.is_cuda:
            torch.cuda.synchronize(result.device)  # the importance step reads tau: it syncs anyway
        times.append(time.perf_counter() - start)
        del times[: -self.AUTO_WINDOW]

    def _measure_costs(
        self, model: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn
    ) -> None:
        """Time uniform steps (between consecutive calls) and, once, a scoring probe; then set the
        switch's threshold to the measured cost ratio of an importance step to a uniform one."""
        if self._last_call is not None and self._last_was_uniform:
            self._record(self.step_times, self._last_call)
        self._last_call = time.perf_counter()
        if not self.score_times and len(self.step_times) >= 5:  # probe: one timed scoring forward
            idx = self.stream.take(self.presample_size)
            start = time.perf_counter()
            result = self.scores(model, fetch(inputs, idx), targets[idx], loss_fn)
            self._record(self.score_times, start, result)
            self._last_call = time.perf_counter()  # the probe is not part of the next step's time
        if self.step_times and self.score_times:
            t_step, t_score = (
                statistics.median(self.step_times),
                statistics.median(self.score_times),
            )
            self.switch.threshold = (t_step + t_score) / t_step

    def metrics(self) -> dict[str, float]:
        if not self.auto_threshold:
            return {}
        median = lambda t: 1000 * statistics.median(t) if t else float("nan")  # noqa: E731
        return {
            "tau_threshold": self.switch.threshold,
            "cost_step_ms": median(self.step_times),
            "cost_score_ms": median(self.score_times),
        }

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "switch": self.switch.state_dict(),
            "scored": self.scored,
            "fallbacks": self.fallbacks,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.switch.load_state_dict(state["switch"])
        self.scored, self.fallbacks = int(state["scored"]), int(state["fallbacks"])


class _eval_mode:
    """Score in eval mode: BatchNorm in train mode would make a sample's output depend on its
    batch, and dropout would make the score random. Restores the previous mode."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)

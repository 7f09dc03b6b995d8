"""The maths of Algorithm 1 (docs/method.md#algorithm-1): presample -> score -> resample -> weights, and the
tau switch. Pure functions on tensors, so they drop into any training loop::

    probs = importance_probabilities(scores)                 # g_i = G_i / sum_j G_j over U
    positions, weights = resample(probs, batch_size)          # b draws from U, w_i = 1/(B g_i)
    loss = (weights * per_sample_loss[positions]).mean()      # unbiased for the mean over U
    switch.update(equivalent_batch_increment(probs))          # tau <- a tau + (1 - a) tau_hat

The sampler objects that use them (which points to load, which to train on) are in samplers.py.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

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
    scores = scores if scores.dtype == torch.float64 else scores.float()  # float64 stays
    if smoothing:
        scores = scores + smoothing
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
    """tau_hat (docs/method.md#the-equivalent-batch-increment-tau): importance sampling with batch b has the
    variance of uniform sampling with batch tau * b.

    ``variance``: 1/tau = 1 - ||g - u||^2 / ||g||^2, which simplifies to tau = B * sum_i g_i^2
    (in units of batch size, i.e. of gradient variance; 1 for uniform g; B for a one-hot g).
    ``std``: its square root, the official Keras code's quantity (units of standard deviation).
    Returns a 0-dim tensor (no host synchronisation).
    """
    probs = probs if probs.dtype == torch.float64 else probs.float()
    tau = len(probs) * probs.pow(2).sum()
    return tau.sqrt() if kind == "std" else tau


def score_sums(scores: Tensor, smoothing: float = 0.0) -> Tensor:
    """[sum_i s_i, sum_i s_i^2] of (smoothed) scores (2,): what tau needs besides the number of
    scores, and what data-parallel ranks add up (one all-reduce of two numbers) to agree on tau
    over their combined presample."""
    s = scores if scores.dtype == torch.float64 else scores.float()
    if smoothing:
        s = s + smoothing
    return torch.stack([s.sum(), s.square().sum()])


def tau_from_sums(sums: Tensor | Sequence[float], n: int, kind: TauKind = "variance"):
    """tau_hat = n sum s^2 / (sum s)^2 = B sum_i g_i^2 over the n scores summed in ``sums``
    (``score_sums``, possibly added up over ranks); 1 (uniform) when every score is 0; NaN when
    a score was NaN or infinite. A 0-dim tensor for a tensor of sums (no host synchronisation),
    a float for two floats."""
    if not isinstance(sums, Tensor):
        total, squares = sums
        tau = 1.0 if total == 0 else n * squares / total**2
        return math.sqrt(tau) if kind == "std" else tau
    total, squares = sums.unbind()
    tau = torch.where(total == 0, 1.0, n * squares / total.square())
    return tau.sqrt() if kind == "std" else tau


def default_tau_threshold(batch_size: int, presample_size: int) -> float:
    """tau_th = (B + 3b) / (3b): the cost of an importance step over a uniform one, taking a
    backward pass as twice a forward pass (docs/method.md#the-threshold)."""
    return (presample_size + 3 * batch_size) / (3 * batch_size)


class VarianceReductionSwitch:
    """Exponential moving average of tau_hat; importance sampling is on while tau > threshold.

    ``update`` takes tau_hat as a float or as a 0-dim tensor on the device and never waits for
    it. ``on`` is the decision for the next batch to load:
    - on the CPU (and for floats), from the latest tau, exactly as Algorithm 1;
    - on CUDA, from the tau of the update *before* the latest one: each update starts an
      asynchronous copy of its decision to the host, and ``on`` reads the copy of one step ago,
      which has finished by then. So no step waits for the GPU to finish the step before it
      (a decision one step late changes nothing that matters: tau is a moving average).
    Reading ``tau`` (for a metrics row) synchronises, and raises if tau is not finite.
    """

    def __init__(self, threshold: float, momentum: float = 0.9):
        self.threshold = float(threshold)
        self.momentum = float(momentum)
        self._tau: float | Tensor = 0.0  # Algorithm 1 starts with tau = 0: first steps uniform
        self._decision = False  # CUDA: the last decision read from a finished copy
        self._copies: deque = deque()  # CUDA: (pinned bool, event or None) per update, oldest first

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
        self._copies.clear()
        self._decision = self._tau > self.threshold

    @property
    def on(self) -> bool:
        if not self._copies:  # the CPU, or nothing updated on CUDA yet
            return _to_float(self._tau) > self.threshold
        while len(self._copies) > 1:  # keep the newest copy for the next decision
            flag, event = self._copies.popleft()
            if event is not None:
                event.synchronize()  # recorded one step ago: already done, in practice
            self._decision = bool(flag)
        return self._decision

    def update(self, tau_hat: float | Tensor) -> None:
        if isinstance(tau_hat, Tensor):  # two operations, on the device
            self._tau = (tau_hat * (1.0 - self.momentum)).add_(self._tau, alpha=self.momentum)
        else:
            self._tau = self.momentum * self._tau + (1.0 - self.momentum) * tau_hat
        if isinstance(self._tau, Tensor) and self._tau.is_cuda:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(self._tau > self.threshold, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._copies.append((flag, event))

    def state_dict(self) -> dict:
        state = {"tau": self.tau, "decision": self.on}
        if self._copies:  # CUDA: the newest decision, not read yet
            flag, event = self._copies[-1]
            if event is not None:
                event.synchronize()
            state["pending"] = bool(flag)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.tau = state["tau"]
        self._decision = bool(state.get("decision", self._decision))
        if "pending" in state:
            self._copies.append((torch.tensor(bool(state["pending"])), None))


def _to_float(value: float | Tensor) -> float:
    return float(value) if isinstance(value, Tensor) else value

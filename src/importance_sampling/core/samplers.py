"""The samplers: which training points to load, and which of the loaded points to train on.

A sampler has two halves, used by the training loop (trainer.py) or by your own loop::

    for presample in loaded:                       # x, y, indices of the points batches() chose
        sampler.before_step(progress)              # the fraction of the run done (0-1)
        chosen = sampler.select(model, presample, loss_fn)   # positions to train on, weights
        with sampler.watch(model, chosen):         # what a sampler records of the step itself
            logits = model(chosen.x)
            loss = chosen.weighted_mean(loss_fn(logits, chosen.y))
        loss.backward()
        sampler.update(chosen, logits.detach(), loss_fn, model)  # tau switch, histories
        optimizer.step()

- ``batches()`` is the *index sampler*: an endless stream of this rank's dataset indices, b
  points for a uniform step, B for an importance step (B when the tau switch was on as the
  batch was drawn). It is used directly on tensors kept on the device, or as a DataLoader's
  ``batch_sampler`` (sources.py) when the data streams from disk.
- ``select()`` is the *selector*: it takes what was loaded, (x, y, indices), scores it when it
  is a presample, and returns the positions to train on and their loss weights; the trained
  views are the scored views (an augmented image is scored and trained on as the same view).

With data-parallel ranks (distributed.py) b and B are global: each of the W ranks loads and
scores B/W points of one seeded permutation, draws b/W with replacement and weights each loss
1/((B/W) g_i); DDP's gradient average then estimates the mean gradient over all B points. tau
comes from scores summed over all ranks, so every rank takes the same decision at every step.

``before_step`` and ``watch`` are optional in a loop of your own: a sampler that needs the run's
progress (InfoBatch's annealing) can count passes itself instead (``num_passes``), and the
gradient-norm sampler without ``watch`` scores its uniform steps with an extra pass.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .collectives import Distributed
from .grad_norms import GradNormRecorder, gradient_norm_scores
from .order import EpochOrder, mix_seed
from .sampling import (
    TauKind,
    VarianceReductionSwitch,
    default_tau_threshold,
    importance_probabilities,
    resample,
    score_sums,
    tau_from_sums,
)
from .scores import LossFn, loss_scores, upper_bound_scores

SCORES = ("loss", "upper_bound", "gradient_norm")


@dataclass
class Presample:
    """Loaded training points: inputs (n, ...) as they are trained on (augmented), targets (n,),
    dataset indices (n,), on the training device."""

    x: Tensor
    y: Tensor
    indices: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Selection:
    """What one step trains on: ``positions`` (b,) of the presample (None: all of it), their loss
    ``weights`` (b,) (None: all ones), and whether a non-uniform rule chose them."""

    presample: Presample
    positions: Tensor | None = None
    weights: Tensor | None = None
    importance: bool = False

    def take(self, t: Tensor) -> Tensor:
        """The chosen rows of a per-presample tensor (n, ...) -> (b, ...)."""
        return t if self.positions is None else t[self.positions]

    @property
    def x(self) -> Tensor:
        return self.take(self.presample.x)

    @property
    def y(self) -> Tensor:
        return self.take(self.presample.y)

    @property
    def indices(self) -> Tensor:
        return self.take(self.presample.indices)

    def __len__(self) -> int:
        return len(self.presample) if self.positions is None else len(self.positions)

    def weighted_mean(self, losses: Tensor) -> Tensor:
        """(1/b) sum_k w_k L_k: unbiased for the presample's mean loss (and its gradient)."""
        return losses.mean() if self.weights is None else (self.weights * losses).mean()


class Sampler:
    """Uniform SGD minibatches: load b points (without replacement within an epoch), train on
    them all with weight 1. The base of every sampler; ``presample_size`` is accepted and unused,
    so that one experiment preset can set B for every sampler."""

    name = "uniform"
    progress = 0.0  # fraction of the run's budget used, from before_step

    def __init__(self, batch_size: int = 128, presample_size: int | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"sampler.batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.presample_size = presample_size
        self.scored = 0  # points scored by presample forwards so far (all ranks)

    def setup(
        self,
        num_samples: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dist: Distributed | None = None,
    ) -> None:
        """Bind to a training set of ``num_samples`` points; this rank's data and randomness
        live on ``device`` (``dist``: the data-parallel ranks, default: torch.distributed's)."""
        self.dist = dist or Distributed.current()
        self.num_samples, self.device = int(num_samples), torch.device(device)
        if self.batch_size > num_samples:
            raise ValueError(
                f"sampler.batch_size={self.batch_size} is larger than the training set "
                f"({num_samples} samples)"
            )
        self.batch_r = self._per_rank("batch_size", self.batch_size)
        self.generator = torch.Generator(self.device).manual_seed(mix_seed(seed, self.dist.rank))
        self.order = EpochOrder(num_samples, seed, self.dist.rank, self.dist.world_size, device)
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)  # scores so far

    def _per_rank(self, option: str, value: int) -> int:
        world = self.dist.world_size
        if value % world:
            raise ValueError(
                f"sampler.{option}={value} is not divisible by the {world} processes: b and B are "
                f"global (per step, all processes together)"
            )
        return value // world

    # ---------------------------------------------------------------- which points to load
    def load_size(self) -> int:
        """Points to load for the next step on this rank."""
        return self.batch_r

    def batches(self) -> Iterator[Tensor]:
        """This rank's dataset indices, one tensor per step, forever."""
        while True:
            yield self.order.take(self.load_size())

    def batch_sampler(self) -> Iterator[list[int]]:
        """``batches()`` as lists of ints, for a DataLoader's ``batch_sampler``: the loader then
        reads exactly the points the sampler asks for (b or B of them), in worker processes."""
        return (indices.tolist() for indices in self.batches())

    @property
    def passes(self) -> float:
        """Passes of the index sampler over its data (for a pass-based budget)."""
        return self.order.passes

    # ---------------------------------------------------------------- the step
    def before_step(self, progress: float) -> None:
        """Told, before each step, the fraction of the run's budget used (0-1)."""
        self.progress = progress

    def select(
        self,
        model: nn.Module,
        presample: Presample,
        loss_fn: LossFn,
        more: Callable[[], Presample] | None = None,
    ) -> Selection:
        """The points of ``presample`` to train on (``model``: the network, unwrapped, for
        scoring without gradients; ``more``: loads another presample, for samplers that may need
        more candidates)."""
        return Selection(presample)

    def watch(self, model: nn.Module, chosen: Selection) -> AbstractContextManager:
        """A context around the step's forward pass on ``chosen`` (``model``: the module the
        step calls), in which a sampler records what it needs of the step's own forward and
        backward (the gradient-norm sampler: each point's gradient norm). Default: nothing."""
        return nullcontext()

    def update(
        self, chosen: Selection, logits: Tensor, loss_fn: LossFn, model: nn.Module | None = None
    ) -> None:
        """After the step's forward and backward pass on ``chosen`` (``logits``: its outputs,
        detached; ``model``: the network, for a sampler that must score the points itself)."""

    # ---------------------------------------------------------------- reporting and state
    @property
    def tau(self) -> float:
        return float("nan")  # no variance estimate

    @property
    def fallbacks(self) -> int:
        return 0

    def metrics(self) -> dict[str, float]:
        """Extra columns for metrics.csv (the same keys at every row of a run)."""
        return {}

    def state_dict(self) -> dict:
        return {
            "order": self.order.state_dict(),
            "generator": self.generator.get_state(),
            "scored": self.scored,
        }

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.generator.set_state(state["generator"].cpu())
        self.scored = int(state["scored"])


UniformSampler = Sampler


class ImportanceSampler(Sampler):
    """Algorithm 1 of the paper with a choice of score.

    Args:
        score: ``loss``, ``upper_bound`` or ``gradient_norm`` (see scores.py).
        batch_size: b, points per SGD step (all ranks together).
        presample_size: B > b, points scored per importance step; None = 3 b (the official default).
        tau_threshold: tau_th; None = (B + 3b) / (3b), the cost ratio of the two kinds of step
            when a backward costs two forwards; ``auto`` = the *measured* cost ratio
            (t_uniform_step + t_scoring_forward) / t_uniform_step, re-estimated during the run
            (medians of the last ``AUTO_WINDOW`` timings; a timed scoring probe provides the first
            scoring time). Logged as the ``tau_threshold``, ``cost_step_ms``, ``cost_score_ms`` columns.
        tau_momentum: a_tau of the moving average of tau_hat.
        tau_kind: ``variance`` (tau = B sum g^2, docs/method.md#two-units-for-tau) or ``std`` (its square root, as
            in the official code); the default threshold is the same for both.
        smoothing: constant added to every score before normalising (0 = the paper's rule).
        score_chunk_size: points per scoring forward (per forward + backward for
            gradient_norm); None = b (per rank): a presample is scored in forwards of the training
            batch's size, so a scored point costs what a trained point's forward costs (one
            forward over B = 3b points costs more per point once its activations leave the
            cache; docs/benchmarks.md gives the measured figures and their command).
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
        score_chunk_size: int | None = None,
    ):
        super().__init__(batch_size)
        if score not in SCORES:
            raise ValueError(f"sampler.score={score!r} is not one of {', '.join(SCORES)}")
        self.name = self.score = score
        self.presample_size = int(presample_size or 3 * self.batch_size)
        if self.presample_size <= self.batch_size:
            raise ValueError(
                f"sampler.presample_size (B={self.presample_size}) must be larger than "
                f"sampler.batch_size (b={self.batch_size}): b points are drawn from B"
            )
        self.auto_threshold = tau_threshold == "auto"
        if tau_threshold is None or self.auto_threshold:
            tau_threshold = default_tau_threshold(self.batch_size, self.presample_size)
        if (
            isinstance(tau_threshold, bool)
            or not isinstance(tau_threshold, int | float)
            or tau_threshold < 1
        ):
            raise ValueError(
                f"sampler.tau_threshold must be >= 1 (tau is 1 for uniform scores), got {tau_threshold}"
            )
        if not 0 <= tau_momentum < 1:
            raise ValueError(f"sampler.tau_momentum must be in [0, 1), got {tau_momentum}")
        if tau_kind not in ("variance", "std"):
            raise ValueError(f"sampler.tau_kind={tau_kind!r} is not one of variance, std")
        if smoothing < 0:
            raise ValueError(f"sampler.smoothing must be >= 0, got {smoothing}")
        self.tau_kind: TauKind = tau_kind
        self.smoothing = float(smoothing)
        if score_chunk_size is not None and (
            isinstance(score_chunk_size, bool)
            or not isinstance(score_chunk_size, int)
            or score_chunk_size < 1
        ):
            raise ValueError(
                f"sampler.score_chunk_size must be an integer >= 1 or null, got {score_chunk_size!r}"
            )
        self.score_chunk_size = score_chunk_size
        self.switch = VarianceReductionSwitch(tau_threshold, tau_momentum)
        self._recorder: GradNormRecorder | None = None  # gradient_norm: norms of a uniform step
        self._recorded = False  # the recorder watched this step's forward
        self.step_times: list[float] = []  # seconds between select() calls of uniform steps (auto)
        self.score_times: list[float] = []  # seconds of scoring forwards over B points (auto)
        self._last_call: float | None = None
        self._last_was_uniform = False

    def setup(
        self,
        num_samples: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dist: Distributed | None = None,
    ) -> None:
        super().setup(num_samples, seed, device, dist)
        if self.presample_size > num_samples:
            raise ValueError(
                f"sampler.presample_size={self.presample_size} is larger than the training set "
                f"({num_samples} samples)"
            )
        self.presample_r = self._per_rank("presample_size", self.presample_size)
        self._fallbacks: int | Tensor = 0
        # on the CPU reading a number costs nothing: tau stays a float there; on a GPU it stays on
        # the device, so that no step waits for it (tests/test_host_sync.py checks that path)
        self.tau_on_host = self.device.type == "cpu"

    @property
    def tau(self) -> float:
        return self.switch.tau

    @property
    def fallbacks(self) -> int:
        """Importance steps whose scores were all equal or all zero (so a uniform step)."""
        return int(self._fallbacks)

    def load_size(self) -> int:
        return self.presample_r if self.switch.on else self.batch_r

    # ---------------------------------------------------------------- scores
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
        chunk = self.chunk_size
        if self.score == "gradient_norm":
            with eval_mode(model):
                return gradient_norm_scores(model, inputs, targets, loss_fn, chunk)
        if logits is None:
            with eval_mode(model), torch.inference_mode():
                logits = torch.cat(
                    [model(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)]
                )
        fn = loss_scores if self.score == "loss" else upper_bound_scores
        return fn(logits, targets, loss_fn)

    @property
    def chunk_size(self) -> int:
        """Points per scoring forward: ``score_chunk_size``, or this rank's b."""
        return self.score_chunk_size or getattr(self, "batch_r", self.batch_size)

    def distribution(self, scores: Tensor) -> Tensor:
        """The sampling distribution g over a set of scored points, shape (n,) -> (n,); NaN where
        a score was not finite (``draw`` guards against it without a host synchronisation)."""
        return importance_probabilities(scores, self.smoothing, check=False)

    def tau_hat(self, sums, n: int):
        """tau_hat of the distribution from ``score_sums`` of the n points of the (combined)
        presample (a tensor, or two floats)."""
        return tau_from_sums(sums, n, self.tau_kind)

    # ---------------------------------------------------------------- the step
    def select(
        self,
        model: nn.Module,
        presample: Presample,
        loss_fn: LossFn,
        more: Callable[[], Presample] | None = None,
    ) -> Selection:
        if self.auto_threshold:
            self._measure_costs(model, presample, loss_fn)
        if len(presample) <= self.batch_r:  # loaded while the switch was off: a uniform step
            return Selection(presample)
        start = time.perf_counter()
        scores = self.scores(model, presample.x, presample.y, loss_fn)
        if self.auto_threshold:
            self._record(self.score_times, start, scores)
        self.scored += len(presample) * self.dist.world_size
        return self.draw(presample, scores)

    def draw(self, presample: Presample, scores: Tensor) -> Selection:
        """Resample b of the scored presample, weight them, update tau (Algorithm 1, 7-9 and 17).
        No host synchronisation: unusable scores are recorded in ``finite`` and replaced by the
        uniform distribution, so the draw itself stays valid."""
        probs = self.distribution(scores)
        valid = (probs >= 0).all()  # False for a NaN (a non-finite score) or a negative score
        self.finite &= valid
        probs = torch.where(valid, probs, 1.0 / len(probs))
        tau_hat = self.update_tau(scores)
        self._fallbacks = self._fallbacks + (tau_hat <= 1 + 1e-6)  # equal scores: uniform
        positions, weights = resample(probs, self.batch_r, self.generator)
        return Selection(presample, positions, weights, importance=True)

    def update_tau(self, scores: Tensor) -> Tensor:
        """Fold tau_hat of these scores, summed over all ranks, into the switch; returns tau_hat."""
        sums = self.dist.all_reduce_(score_sums(scores, self.smoothing))
        n = len(scores) * self.dist.world_size  # every rank scores as many points
        if self.tau_on_host:
            tau_hat = self.tau_hat(sums.tolist(), n)
            if not math.isfinite(tau_hat):  # a score was NaN or infinite
                self.finite.fill_(False)
        else:
            tau_hat = self.tau_hat(sums, n)
            self.finite &= torch.isfinite(tau_hat)
        self.switch.update(tau_hat)
        return tau_hat

    def watch(self, model: nn.Module, chosen: Selection) -> AbstractContextManager:
        """The gradient-norm sampler's uniform steps: record each point's gradient norm in the
        step's own backward (its tau then needs no extra pass). A compiled graph hides the
        layers' activations: ``update`` then scores the batch itself."""
        self._recorded = False
        module = getattr(model, "module", model)  # inside DistributedDataParallel
        if self.score != "gradient_norm" or chosen.importance or hasattr(module, "_orig_mod"):
            return nullcontext()
        if self._recorder is None or self._recorder.model is not module:
            self._recorder = GradNormRecorder(module)
        self._recorded = True
        return self._recorder

    def update(
        self, chosen: Selection, logits: Tensor, loss_fn: LossFn, model: nn.Module | None = None
    ) -> None:
        """After a uniform step, its own b points give the next tau_hat (Algorithm 1, line 15):
        the logits of the step's forward for the loss and the upper bound; for the gradient norm
        the norms recorded in the step's backward (``watch``), or without them a scoring pass."""
        if chosen.importance:
            return
        if self._recorded:  # (w_i / n)^2 ||grad L_i||^2 of the weighted mean loss -> ||grad L_i||
            self._recorded = False
            factor = 1.0 if chosen.weights is None else chosen.weights.detach()
            scores = self._recorder.squared_norms().sqrt() * len(chosen) / factor
        else:
            if model is None and self.score == "gradient_norm":
                raise ValueError(
                    "the gradient-norm score needs the model after a uniform step: pass it, "
                    "update(chosen, logits, loss_fn, model) (or train inside "
                    "sampler.watch(model, chosen), which records the norms in the step's backward)"
                )
            scores = self.scores(model, chosen.x, chosen.y, loss_fn, logits=logits)
        self.update_tau(scores)

    # ------------------------------------------------------------ tau_threshold: auto
    AUTO_WINDOW = 20

    def _record(self, times: list[float], start: float, result: Tensor | None = None) -> None:
        """Append the seconds since ``start`` (after the GPU finished ``result``) to ``times``."""
        if result is not None and result.is_cuda:
            torch.cuda.synchronize(result.device)  # only with tau_threshold=auto: timing needs it
        times.append(time.perf_counter() - start)
        del times[: -self.AUTO_WINDOW]

    def _measure_costs(self, model: nn.Module, presample: Presample, loss_fn: LossFn) -> None:
        """Time uniform steps (between consecutive calls) and, once, a scoring probe; then set the
        switch's threshold to the measured cost ratio of an importance step to a uniform one
        (rank 0's, so that every rank compares tau with the same threshold)."""
        if self._last_call is not None and self._last_was_uniform:
            self._record(self.step_times, self._last_call)
        self._last_call = time.perf_counter()
        self._last_was_uniform = len(presample) <= self.batch_r
        if not self.score_times and len(self.step_times) >= 5:
            # probe: score B points, the loaded ones repeated (the cost depends on shapes only)
            reps = math.ceil(self.presample_r / len(presample))
            x = presample.x.repeat(reps, *[1] * (presample.x.dim() - 1))[: self.presample_r]
            y = presample.y.repeat(reps)[: self.presample_r]
            start = time.perf_counter()
            self._record(self.score_times, start, self.scores(model, x, y, loss_fn))
            self._last_call = time.perf_counter()  # the probe is not part of the next step's time
        if self.step_times and self.score_times:
            t_step = statistics.median(self.step_times)
            t_score = statistics.median(self.score_times)
            (self.switch.threshold,) = self.dist.broadcast_floats([(t_step + t_score) / t_step])

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
            "fallbacks": self.fallbacks,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.switch.load_state_dict(state["switch"])
        self._fallbacks = int(state["fallbacks"])


class eval_mode:
    """Score in eval mode: BatchNorm in train mode would make a sample's output depend on its
    batch, and dropout would make the score random. Restores the previous mode."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)

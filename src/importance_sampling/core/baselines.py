"""Data-selection methods beyond the paper, behind the same sampler interface (samplers.Sampler),
so they run through train.py, write the same metrics and appear in the same comparisons.

- ``OnlineBatchSampler``        Loshchilov & Hutter (2015), online batch selection: the paper's
                                baseline. Rank-based, biased (no weights). An index sampler: it
                                needs every sample's last loss.
- ``HistorySampler``            importance sampling from each sample's last seen score: no extra
                                forward pass; unbiased weights and the tau switch. A selector.
- ``SelectiveBackpropSampler``  Jiang et al. (2019): keep a sample with probability
                                percentile(loss)^beta; biased by design. A selector.
- ``InfoBatchSampler``          Qin et al. (ICLR 2024): prune a share of the below-mean-loss samples
                                each pass, rescale the kept ones, use all data at the end. An
                                index sampler.

Per-sample state (last losses) lives in tensors of size N on the training device. With several
data-parallel ranks every rank keeps the whole table: the losses of each step are gathered from
all ranks (as the InfoBatch code does), and the index samplers draw with a generator seeded
identically on every rank, then shard what they drew, so the ranks agree without talking more.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .collectives import Distributed
from .order import mix_seed, shard
from .samplers import ImportanceSampler, Presample, Sampler, Selection, eval_mode
from .sampling import tau_from_sums
from .scores import LossFn, loss_scores, upper_bound_scores


class _LastLossTable:
    """Last seen per-sample value and the step it was seen at; unseen entries are NaN."""

    def __init__(self, n: int, device: torch.device, dist: Distributed | None = None):
        self.values = torch.full((n,), float("nan"), device=device)
        self.seen_at = torch.full((n,), -1, dtype=torch.long, device=device)
        self.dist = dist or Distributed()

    def update(self, indices: Tensor, values: Tensor, step: int) -> None:
        """Record ``values`` (k,) of ``indices`` (k,), and those of every other rank's step."""
        indices, values = self.dist.all_gather(indices), self.dist.all_gather(values.float())
        self.values[indices] = values
        self.seen_at[indices] = step

    def state_dict(self) -> dict:
        return {"values": self.values, "seen_at": self.seen_at}

    def load_state_dict(self, state: dict) -> None:
        self.values.copy_(state["values"])
        self.seen_at.copy_(state["seen_at"])


class OnlineBatchSampler(Sampler):
    """Online batch selection (Loshchilov & Hutter, 2015).

    All N samples are ranked by their latest known loss (highest first; unseen samples count as
    highest); rank r in 0..N-1 is drawn with probability proportional to exp(-log(s) r / N), so the
    top sample is ``selection_pressure`` (s) times likelier than the last. The ranking is redone
    every ``resort_every`` steps; the losses of every trained batch refresh the table. No
    importance weights: the gradient is biased towards hard samples, as in the original method.
    """

    name = "online_batch"

    def __init__(
        self,
        batch_size: int = 128,
        presample_size: int | None = None,
        selection_pressure: float = 100.0,
        resort_every: int = 1,
    ):
        super().__init__(batch_size)
        if selection_pressure < 1:
            raise ValueError(f"sampler.selection_pressure must be >= 1, got {selection_pressure}")
        if resort_every < 1:
            raise ValueError(f"sampler.resort_every must be >= 1, got {resort_every}")
        self.selection_pressure, self.resort_every = float(selection_pressure), int(resort_every)
        self.steps = 0

    def setup(self, num_samples, seed=0, device="cpu", dist=None) -> None:
        super().setup(num_samples, seed, device, dist)
        self.table = _LastLossTable(num_samples, self.device, self.dist)
        ranks = torch.arange(num_samples, device=self.device, dtype=torch.float32)
        self.rank_probs = rank_probabilities(ranks, self.selection_pressure)
        # the same draws on every rank; each rank then loads its share of them
        self.shared = torch.Generator(self.device).manual_seed(mix_seed(seed, 0x0B5))
        self.ranking = torch.randperm(num_samples, generator=self.shared, device=self.device)

    def batches(self) -> Iterator[Tensor]:
        while True:
            if self.steps % self.resort_every == 0:
                self.ranking = rank_by_loss(self.table.values, self.shared)
            self.steps += 1
            ranks = torch.multinomial(
                self.rank_probs, self.batch_size, replacement=False, generator=self.shared
            )
            yield self.ranking[ranks][self.dist.rank :: self.dist.world_size]

    @property
    def passes(self) -> float:
        return self.steps * self.batch_size / self.num_samples

    def select(self, model, presample, loss_fn, more=None) -> Selection:
        return Selection(presample, importance=True)

    def update(self, chosen, logits, loss_fn, model=None) -> None:
        self.table.update(chosen.indices, loss_scores(logits, chosen.y, loss_fn), self.steps)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "table": self.table.state_dict(),
            "steps": self.steps,
            "shared": self.shared.get_state(),
            "ranking": self.ranking,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.table.load_state_dict(state["table"])
        self.steps = int(state["steps"])
        self.shared.set_state(state["shared"].cpu())
        self.ranking = state["ranking"].to(self.device)


def rank_probabilities(ranks: Tensor, selection_pressure: float) -> Tensor:
    """p(rank r) proportional to exp(-log(s) r / N), r = 0..N-1: p(0) / p(N-1) ~= s."""
    logits = -math.log(selection_pressure) * ranks / len(ranks)
    return torch.softmax(logits, dim=0)


def rank_by_loss(losses: Tensor, generator: torch.Generator) -> Tensor:
    """Dataset indices from the highest to the lowest loss; unseen (NaN) first, ties at random."""
    noise = torch.rand(losses.shape, generator=generator, device=losses.device) * 1e-6
    key = torch.where(torch.isnan(losses), torch.full_like(losses, math.inf), losses + noise)
    return torch.argsort(key, descending=True)


class HistorySampler(ImportanceSampler):
    """Importance sampling from each sample's *last seen* score: no scoring forward at all.

    Like ImportanceSampler (presample B uniformly, draw b with p proportional to the score,
    weights 1 / (B p), the tau switch), but the scores of the presample come from a per-sample
    table filled by the forward passes of the training steps (``score``: ``loss`` or
    ``upper_bound``). Unseen entries, and entries older than ``staleness`` steps (None: never
    stale), get the mean of the fresh ones, so they are drawn at an average rate.
    The weights keep the estimator unbiased whatever the scores, stale or not; but a sample
    whose old score is tiny gets a huge weight 1 / (B p) when it is drawn, and its current
    gradient need not be tiny. So p is mixed with the uniform distribution,
    p = (1 - ``uniform_mix``) g + ``uniform_mix`` / B (defensive importance sampling, still
    unbiased), which caps every weight at 1 / uniform_mix. Because scoring costs nothing, the
    default threshold is tau_th = 1.1 rather than the cost ratio.
    """

    def __init__(
        self,
        score: str = "upper_bound",
        *,
        tau_threshold: float | None = 1.1,
        staleness: int | None = None,
        uniform_mix: float = 0.5,
        **options,
    ):
        """``options``: the other options of ImportanceSampler (batch_size, presample_size,
        tau_momentum, tau_kind, smoothing, score_chunk_size), with its defaults."""
        if not 0 <= uniform_mix <= 1:
            raise ValueError(f"sampler.uniform_mix must be in [0, 1], got {uniform_mix}")
        if score not in ("loss", "upper_bound"):
            raise ValueError(
                f"sampler.score={score!r}: the history sampler keeps loss or upper_bound scores"
            )
        if tau_threshold == "auto":
            raise ValueError(
                "sampler.tau_threshold=auto measures the scoring forward, which the "
                "history sampler does not have: give a number (default 1.1)"
            )
        if staleness is not None and staleness < 1:
            raise ValueError(f"sampler.staleness must be >= 1 step or null, got {staleness}")
        super().__init__(score, tau_threshold=tau_threshold, **options)
        self.name = "history"
        self.staleness, self.uniform_mix = staleness, float(uniform_mix)
        self.steps = 0

    def setup(self, num_samples, seed=0, device="cpu", dist=None) -> None:
        super().setup(num_samples, seed, device, dist)
        self.table = _LastLossTable(num_samples, self.device, self.dist)

    def table_scores(self, indices: Tensor) -> Tensor:
        """The table's scores of ``indices`` (n,), unseen and stale ones filled with the mean of
        the fresh ones (no host synchronisation)."""
        values, seen_at = self.table.values[indices], self.table.seen_at[indices]
        fresh = ~torch.isnan(values)
        if self.staleness is not None:
            fresh &= (self.steps - seen_at) <= self.staleness
        count = fresh.sum()
        mean = torch.where(fresh, values, 0.0).sum() / count.clamp(min=1)
        fill = torch.where(count > 0, mean, torch.ones_like(mean))
        return torch.where(fresh, values, fill)

    def select(self, model, presample, loss_fn, more=None) -> Selection:
        self.steps += 1
        if len(presample) <= self.batch_r:
            return Selection(presample)
        return self.draw(presample, self.table_scores(presample.indices))

    def distribution(self, scores: Tensor) -> Tensor:
        probs = super().distribution(scores)
        return (1 - self.uniform_mix) * probs + self.uniform_mix / len(probs)

    def tau_hat(self, sums, n: int):
        # B sum p^2 of the mixture p = (1 - m) g + m / B is (1 - m)^2 B sum g^2 + 1 - (1 - m)^2
        variance = tau_from_sums(sums, n)
        keep = (1 - self.uniform_mix) ** 2
        mixed = keep * variance + 1 - keep
        return mixed**0.5 if self.tau_kind == "std" else mixed

    def update(self, chosen, logits, loss_fn, model=None) -> None:
        fn = loss_scores if self.score == "loss" else upper_bound_scores
        scores = fn(logits, chosen.y, loss_fn)
        self.table.update(chosen.indices, scores, self.steps)
        if not chosen.importance:  # a uniform step's own scores give tau_hat, as in Algorithm 1
            self.update_tau(scores)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "table": self.table.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.table.load_state_dict(state["table"])
        self.steps = int(state["steps"])


class SelectiveBackpropSampler(Sampler):
    """Selective backprop (Jiang et al., 2019): forward candidates, keep each with probability
    percentile(loss)^beta among the last ``history_size`` losses seen, and train on full batches
    of b kept samples (loading more candidates until there are b). Biased by design (no
    weights): it trains on the hard samples. With several ranks each keeps b/W of its own
    candidates, so the ranks may load different numbers of candidates per step."""

    name = "selective_backprop"

    def __init__(
        self,
        batch_size: int = 128,
        presample_size: int | None = None,
        beta: float = 1.0,
        history_size: int = 1024,
        score_chunk_size: int | None = None,
    ):
        super().__init__(batch_size)
        if beta < 0:
            raise ValueError(f"sampler.beta must be >= 0, got {beta}")
        if history_size < 1:
            raise ValueError(f"sampler.history_size must be >= 1, got {history_size}")
        self.beta, self.history_size = float(beta), int(history_size)
        self.score_chunk_size = score_chunk_size  # unused: candidates are forwarded b at a time

    def setup(self, num_samples, seed=0, device="cpu", dist=None) -> None:
        super().setup(num_samples, seed, device, dist)
        self.history = torch.empty(0, device=self.device)  # the most recent losses, oldest first

    def keep_probability(self, losses: Tensor) -> Tensor:
        """percentile of each loss among the history (and itself), to the power beta."""
        reference = torch.cat([self.history, losses])
        percentile = (reference[None, :] <= losses[:, None]).float().mean(1)
        return percentile.pow(self.beta)

    def select(
        self,
        model: nn.Module,
        presample: Presample,
        loss_fn: LossFn,
        more: Callable[[], Presample] | None = None,
    ) -> Selection:
        kept: list[Presample] = []
        n_kept = 0
        while True:
            with eval_mode(model), torch.inference_mode():
                losses = loss_scores(model(presample.x), presample.y, loss_fn)
            self.scored += len(presample) * self.dist.world_size
            keep = torch.rand(
                len(losses), generator=self.generator, device=losses.device
            ) < self.keep_probability(losses)
            self.history = torch.cat([self.history, losses])[-self.history_size :]
            kept.append(Presample(presample.x[keep], presample.y[keep], presample.indices[keep]))
            n_kept += int(keep.sum())  # one host synchronisation per candidate batch
            if n_kept >= self.batch_r:
                break
            if more is None:
                raise RuntimeError("selective backprop needs more candidates: pass select(more=)")
            presample = more()
        b = self.batch_r
        chosen = Presample(
            torch.cat([k.x for k in kept])[:b],
            torch.cat([k.y for k in kept])[:b],
            torch.cat([k.indices for k in kept])[:b],
        )
        return Selection(chosen, importance=True)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = state["history"].to(self.device)


class InfoBatchSampler(Sampler):
    """InfoBatch (Qin et al., ICLR 2024): at each pass over the data, the samples whose last loss
    is below the mean of the last losses are pruned at rate ``prune_ratio`` r, and the kept ones
    among them get weight 1 / (1 - r), which keeps the expected gradient; passes from ``anneal``
    of the run on keep every sample (weights 1). Unseen samples are always kept.

    "The run" is ``num_passes`` passes when given (the InfoBatch paper's budget: a pass over
    the pruned data is shorter than an epoch), otherwise the trainer's budget (``progress``).
    Pruning draws exactly floor((1 - r) n_low + U) of the n_low below-mean samples, U uniform in
    [0, 1): the official code keeps int((1 - r) n_low), the same up to rounding, but its rounding
    down would drop every such sample when (1 - r) n_low < 1; ours keeps each with probability
    exactly 1 - r. A pass's last partial batch is dropped (every rank takes full batches)."""

    name = "infobatch"

    def __init__(
        self,
        batch_size: int = 128,
        presample_size: int | None = None,
        prune_ratio: float = 0.5,
        anneal: float = 0.875,
        num_passes: int | None = None,
    ):
        super().__init__(batch_size)
        if not 0 <= prune_ratio < 1:
            raise ValueError(f"sampler.prune_ratio must be in [0, 1), got {prune_ratio}")
        if not 0 < anneal <= 1:
            raise ValueError(f"sampler.anneal must be in (0, 1], got {anneal}")
        if num_passes is not None and num_passes < 1:
            raise ValueError(f"sampler.num_passes must be >= 1 or null, got {num_passes}")
        self.prune_ratio, self.anneal, self.num_passes = (
            float(prune_ratio),
            float(anneal),
            num_passes,
        )
        self.pruned = 0  # samples pruned in the current pass
        self.completed = 0  # passes started so far - 1 (the current pass's number)

    def setup(self, num_samples, seed=0, device="cpu", dist=None) -> None:
        super().setup(num_samples, seed, device, dist)
        self.table = _LastLossTable(num_samples, self.device, self.dist)
        self.shared = torch.Generator(self.device).manual_seed(mix_seed(seed, 0x1B))
        self.weights = torch.ones(num_samples, device=self.device)
        self.share: Tensor | None = None
        self.cursor, self.completed = 0, -1
        self._drawn: deque = deque()  # (indices, weights, pruned?) drawn, not selected yet

    def pass_progress(self) -> float:
        """Fraction of the run done when a pass starts (passes, or the trainer's budget)."""
        if self.num_passes is not None:
            return self.completed / self.num_passes
        return self.progress

    def new_pass(self) -> None:
        """Prune and shuffle the next pass (the same on every rank), then take this rank's share."""
        self.completed += 1
        n = self.num_samples
        losses = self.table.values
        weights = torch.ones(n, device=self.device)
        keep = torch.ones(n, dtype=torch.bool, device=self.device)
        seen = ~torch.isnan(losses)
        if self.pass_progress() < self.anneal and bool(seen.any()):  # one sync per pass
            low = (seen & (losses < losses[seen].mean())).nonzero().squeeze(1)
            u = torch.rand((), generator=self.shared, device=self.device)
            n_keep = int(torch.floor((1 - self.prune_ratio) * len(low) + u))
            order = low[torch.randperm(len(low), generator=self.shared, device=self.device)]
            keep[order[n_keep:]] = False
            weights[order[:n_keep]] = 1.0 / (1.0 - self.prune_ratio)
        kept = keep.nonzero().squeeze(1)
        if len(kept) < self.batch_size:  # never fewer than one batch
            kept, weights = torch.arange(n, device=self.device), torch.ones(n, device=self.device)
        self.pruned = n - len(kept)
        perm = torch.randperm(len(kept), generator=self.shared, device=self.device)
        self.share = shard(kept[perm], self.dist.rank, self.dist.world_size)
        self.weights, self.cursor = weights, 0

    def batches(self) -> Iterator[Tensor]:
        while True:
            if self.share is None or self.cursor + self.batch_r > len(self.share):
                self.new_pass()
            indices = self.share[self.cursor : self.cursor + self.batch_r]
            self.cursor += self.batch_r
            self._drawn.append((indices, self.weights[indices], self.pruned > 0))
            yield indices

    @property
    def passes(self) -> float:
        if self.share is None:
            return 0.0
        if self.cursor + self.batch_r > len(self.share):
            # what is left is less than a batch and is dropped: this pass is over. Counted so,
            # a pass budget stops after exactly that many passes, and the next pass starts at
            # progress k / passes exactly (pruned or annealed as pass k, not as a step before)
            return float(self.completed + 1)
        return self.completed + self.cursor / len(self.share)

    def select(self, model, presample, loss_fn, more=None) -> Selection:
        # the weights as they were when the batch was drawn (a loader draws ahead, maybe into
        # the next pass); batches drawn but never delivered (a loader restarted) are skipped
        while self._drawn:
            indices, weights, pruned = self._drawn.popleft()
            if len(indices) == len(presample) and torch.equal(
                indices, presample.indices.to(indices.device)
            ):
                return Selection(presample, weights=weights, importance=pruned)
        weights = self.weights[presample.indices.to(self.device)]
        return Selection(presample, weights=weights, importance=self.pruned > 0)

    def update(self, chosen, logits, loss_fn, model=None) -> None:
        self.table.update(chosen.indices, loss_scores(logits, chosen.y, loss_fn), 0)

    def metrics(self) -> dict[str, float]:
        return {"pruned": float(self.pruned)}

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "table": self.table.state_dict(),
            "shared": self.shared.get_state(),
            "weights": self.weights,
            "share": self.share,
            "cursor": self.cursor,
            "completed": self.completed,
            "pruned": self.pruned,
            "drawn": list(self._drawn),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.table.load_state_dict(state["table"])
        self.shared.set_state(state["shared"].cpu())
        self.weights = state["weights"].to(self.device)
        self.share = None if state["share"] is None else state["share"].to(self.device)
        self.cursor, self.completed = int(state["cursor"]), int(state["completed"])
        self.pruned = int(state["pruned"])
        self._drawn = deque(
            (i.to(self.device), w.to(self.device), bool(p)) for i, w, p in state["drawn"]
        )

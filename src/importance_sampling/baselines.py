"""Data-selection methods beyond the paper, behind the same sampler interface (sampling.Sampler),
so they run through train.py, write the same metrics and appear in the same comparisons.

- ``OnlineBatchSampler``        Loshchilov & Hutter (2015), online batch selection: the paper's
                                baseline. Rank-based, biased (no weights).
- ``HistorySampler``            importance sampling from each sample's last seen score: no extra
                                forward pass; unbiased weights and the tau switch.
- ``SelectiveBackpropSampler``  Jiang et al. (2019): keep a sample with probability
                                percentile(loss)^beta; biased by design.
- ``InfoBatchSampler``          Qin et al. (ICLR 2024): prune a share of the below-mean-loss samples
                                each epoch, rescale the kept ones, use all data at the end.

Per-sample state (last losses) lives in tensors of size N on the training device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .sampling import (
    Batch,
    ImportanceSampler,
    Inputs,
    Sampler,
    _eval_mode,
    fetch,
    importance_probabilities,
)
from .scores import LossFn, loss_scores, upper_bound_scores


class _LastLossTable:
    """Last seen per-sample value and the step it was seen at; unseen entries are NaN."""

    def __init__(self, n: int, device: torch.device):
        self.values = torch.full((n,), float("nan"), device=device)
        self.seen_at = torch.full((n,), -1, dtype=torch.long, device=device)

    def update(self, indices: Tensor, values: Tensor, step: int) -> None:
        self.values[indices] = values.float()
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

    def setup(self, num_samples: int, generator: torch.Generator, device: torch.device) -> None:
        super().setup(num_samples, generator, device)
        self.table = _LastLossTable(num_samples, device)
        ranks = torch.arange(num_samples, device=device, dtype=torch.float32)
        self.rank_probs = rank_probabilities(ranks, self.selection_pressure)
        self.order = self.stream.take(num_samples)  # before any loss is known: a random order

    def sample(self, model: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn) -> Batch:
        if self.steps % self.resort_every == 0:
            self.order = rank_by_loss(self.table.values, self.generator)
        self.steps += 1
        ranks = torch.multinomial(
            self.rank_probs, self.batch_size, replacement=False, generator=self.generator
        )
        return Batch(self.order[ranks], importance=True)

    def observe(
        self,
        batch: Batch,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        logits: Tensor,
        loss_fn: LossFn,
    ) -> None:
        self.table.update(batch.indices, loss_scores(logits, targets, loss_fn), self.steps)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "table": self.table.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.table.load_state_dict(state["table"])
        self.steps = int(state["steps"])


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
        batch_size: int = 128,
        presample_size: int | None = None,
        tau_threshold: float | None = 1.1,
        tau_momentum: float = 0.9,
        tau_kind: str = "variance",
        smoothing: float = 0.0,
        staleness: int | None = None,
        uniform_mix: float = 0.5,
        score_chunk_size: int = 1024,
    ):
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
        super().__init__(
            score,
            batch_size,
            presample_size,
            tau_threshold,
            tau_momentum,
            tau_kind,
            smoothing,
            score_chunk_size,
        )
        self.name = "history"
        self.staleness, self.uniform_mix = staleness, float(uniform_mix)
        self.steps = 0

    def setup(self, num_samples: int, generator: torch.Generator, device: torch.device) -> None:
        super().setup(num_samples, generator, device)
        self.table = _LastLossTable(num_samples, device)

    def table_scores(self, indices: Tensor) -> Tensor:
        values, seen_at = self.table.values[indices], self.table.seen_at[indices]
        fresh = ~torch.isnan(values)
        if self.staleness is not None:
            fresh &= (self.steps - seen_at) <= self.staleness
        fill = values[fresh].mean() if fresh.any() else torch.ones((), device=values.device)
        return torch.where(fresh, values, fill)

    def sample(self, model: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn) -> Batch:
        self.steps += 1
        if not self.switch.on:
            return Batch(self.stream.take(self.batch_size))
        presample = self.stream.take(self.presample_size)
        return self.draw(presample, self.table_scores(presample))

    def distribution(self, scores: Tensor, check: bool = True) -> Tensor:
        probs = importance_probabilities(scores, self.smoothing, check)
        return (1 - self.uniform_mix) * probs + self.uniform_mix / len(probs)

    def observe(
        self,
        batch: Batch,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        logits: Tensor,
        loss_fn: LossFn,
    ) -> None:
        fn = loss_scores if self.score == "loss" else upper_bound_scores
        scores = fn(logits, targets, loss_fn)
        self.table.update(batch.indices, scores, self.steps)
        if not batch.importance:  # a uniform step's own scores give tau_hat, as in Algorithm 1
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
    of b kept samples. Biased by design (no weights): it trains on the hard samples."""

    name = "selective_backprop"

    def __init__(
        self,
        batch_size: int = 128,
        presample_size: int | None = None,
        beta: float = 1.0,
        history_size: int = 1024,
        score_chunk_size: int = 1024,
    ):
        super().__init__(batch_size)
        if beta < 0:
            raise ValueError(f"sampler.beta must be >= 0, got {beta}")
        if history_size < 1:
            raise ValueError(f"sampler.history_size must be >= 1, got {history_size}")
        self.beta, self.history_size, self.score_chunk_size = (
            float(beta),
            int(history_size),
            int(score_chunk_size),
        )

    def setup(self, num_samples: int, generator: torch.Generator, device: torch.device) -> None:
        super().setup(num_samples, generator, device)
        self.history = torch.empty(0, device=device)  # the most recent losses, oldest first

    def keep_probability(self, losses: Tensor) -> Tensor:
        """percentile of each loss among the history (and itself), to the power beta."""
        reference = torch.cat([self.history, losses])
        percentile = (reference[None, :] <= losses[:, None]).float().mean(1)
        return percentile.pow(self.beta)

    def sample(self, model: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn) -> Batch:
        kept_idx, kept_x = [], []
        n_kept = 0
        while n_kept < self.batch_size:
            candidates = self.stream.take(self.batch_size)
            x = fetch(inputs, candidates)
            with _eval_mode(model), torch.inference_mode():
                losses = loss_scores(model(x), targets[candidates], loss_fn)
            self.scored += len(candidates)
            keep = torch.rand(
                len(losses), generator=self.generator, device=losses.device
            ) < self.keep_probability(losses)
            self.history = torch.cat([self.history, losses])[-self.history_size :]
            kept_idx.append(candidates[keep])
            kept_x.append(x[keep])
            n_kept += int(keep.sum())
        indices, x = torch.cat(kept_idx)[: self.batch_size], torch.cat(kept_x)[: self.batch_size]
        return Batch(indices, importance=True, inputs=x)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = state["history"].to(self.history.device)


class InfoBatchSampler(Sampler):
    """InfoBatch (Qin et al., ICLR 2024): at each epoch, each sample whose last loss is below the
    mean of the last losses is dropped with probability ``prune_ratio`` r; the kept ones among
    them get weight 1 / (1 - r), which keeps the expected gradient; once ``anneal`` of the budget
    is used, every sample is kept (weights 1). Unseen samples are always kept. An "epoch" here is
    one pass over the kept samples."""

    name = "infobatch"

    def __init__(
        self,
        batch_size: int = 128,
        presample_size: int | None = None,
        prune_ratio: float = 0.5,
        anneal: float = 0.875,
    ):
        super().__init__(batch_size)
        if not 0 <= prune_ratio < 1:
            raise ValueError(f"sampler.prune_ratio must be in [0, 1), got {prune_ratio}")
        if not 0 < anneal <= 1:
            raise ValueError(f"sampler.anneal must be in (0, 1], got {anneal}")
        self.prune_ratio, self.anneal = float(prune_ratio), float(anneal)
        self.pruned = 0  # samples pruned in the current epoch

    def setup(self, num_samples: int, generator: torch.Generator, device: torch.device) -> None:
        super().setup(num_samples, generator, device)
        self.table = _LastLossTable(num_samples, device)
        self.epoch_order = torch.empty(0, dtype=torch.long, device=device)
        self.epoch_weights = torch.empty(0, device=device)
        self.cursor = 0

    def new_epoch(self) -> None:
        n = len(self.table.values)
        weights = torch.ones(n, device=self.table.values.device)
        keep = torch.ones(n, dtype=torch.bool, device=weights.device)
        losses = self.table.values
        if self.progress < self.anneal and not torch.isnan(losses).all():
            seen = ~torch.isnan(losses)
            well_learned = seen & (losses < losses[seen].mean())
            dropped = well_learned & (
                torch.rand(n, generator=self.generator, device=weights.device) < self.prune_ratio
            )
            keep = ~dropped
            weights[well_learned] = 1.0 / (1.0 - self.prune_ratio)
        kept = keep.nonzero().squeeze(1)
        if len(kept) < self.batch_size:  # never fewer than one batch
            kept = torch.arange(n, device=weights.device)
        self.pruned = n - len(kept)
        perm = torch.randperm(len(kept), generator=self.generator, device=kept.device)
        self.epoch_order, self.epoch_weights, self.cursor = kept[perm], weights[kept[perm]], 0

    def sample(self, model: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn) -> Batch:
        if self.cursor + self.batch_size > len(self.epoch_order):
            self.new_epoch()
        sl = slice(self.cursor, self.cursor + self.batch_size)
        self.cursor += self.batch_size
        weights = self.epoch_weights[sl]
        return Batch(self.epoch_order[sl], weights, importance=self.pruned > 0)

    def observe(
        self,
        batch: Batch,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        logits: Tensor,
        loss_fn: LossFn,
    ) -> None:
        self.table.update(batch.indices, loss_scores(logits, targets, loss_fn), 0)

    def metrics(self) -> dict[str, float]:
        return {"pruned": float(self.pruned)}

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "table": self.table.state_dict(),
            "order": self.epoch_order,
            "weights": self.epoch_weights,
            "cursor": self.cursor,
            "pruned": self.pruned,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.table.load_state_dict(state["table"])
        self.epoch_order, self.epoch_weights = state["order"], state["weights"]
        self.cursor, self.pruned = int(state["cursor"]), int(state["pruned"])

"""Samplers beyond the paper: selection and weighting rules on hand-checked cases, and a run each."""

import csv
import math

import pytest
import torch

from importance_sampling.core.baselines import (
    HistorySampler,
    InfoBatchSampler,
    OnlineBatchSampler,
    SelectiveBackpropSampler,
    rank_by_loss,
    rank_probabilities,
)
from importance_sampling.core.samplers import ImportanceSampler, Presample
from importance_sampling.core.scores import cross_entropy

CPU = torch.device("cpu")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_rank_probabilities_put_the_selection_pressure_between_first_and_last():
    p = rank_probabilities(torch.arange(5.0), selection_pressure=100.0)
    assert p.sum().item() == pytest.approx(1.0)
    assert (p[0] / p[-1]).item() == pytest.approx(math.exp(math.log(100) * 4 / 5))
    assert torch.all(p[:-1] > p[1:])
    torch.testing.assert_close(rank_probabilities(torch.arange(4.0), 1.0), torch.full((4,), 0.25))


def test_rank_by_loss_puts_unseen_first_then_the_highest_loss():
    losses = torch.tensor([0.5, float("nan"), 2.0, 0.1, 1.0])
    assert rank_by_loss(losses, gen()).tolist() == [1, 2, 4, 0, 3]


def presample_of(indices, x=None):
    x = torch.zeros(len(indices), 1) if x is None else x[indices]
    return Presample(x, torch.zeros(len(indices), dtype=torch.long), indices)


def test_online_batch_draws_high_loss_samples_more_often():
    s = OnlineBatchSampler(batch_size=4, selection_pressure=1e4)
    s.setup(40)
    losses = torch.linspace(0, 1, 40)  # sample 39 has the highest loss
    s.table.update(torch.arange(40), losses, step=0)
    counts = torch.zeros(40)
    batches = s.batches()
    for _ in range(200):
        chosen = s.select(None, presample_of(next(batches)), cross_entropy)
        assert chosen.weights is None and len(set(chosen.indices.tolist())) == 4  # no repeats
        counts[chosen.indices] += 1
    assert counts[30:].sum() > 5 * counts[:10].sum()


def test_history_sampler_resamples_from_the_table_with_unbiased_weights():
    s = HistorySampler("loss", batch_size=2, presample_size=4, tau_threshold=1.0, uniform_mix=0.0)
    s.setup(4)
    s.table.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0, 6.0]), step=0)
    # sample 3 unseen: it gets the mean of the others, (1 + 1 + 6) / 3
    torch.testing.assert_close(
        s.table_scores(torch.arange(4)), torch.tensor([1.0, 1.0, 6.0, 8 / 3])
    )
    s.switch.tau = 5.0
    chosen = s.select(None, presample_of(next(s.batches())), cross_entropy)
    total = 1 + 1 + 6 + 8 / 3
    expected = {0: total / (4 * 1), 1: total / (4 * 1), 2: total / (4 * 6), 3: total / (4 * 8 / 3)}
    for i, w in zip(chosen.indices.tolist(), chosen.weights.tolist(), strict=True):
        assert w == pytest.approx(expected[i], rel=1e-5)
    assert s.scored == 0  # no scoring forward at all


def test_history_sampler_mixes_in_uniform_to_cap_the_weights():
    s = HistorySampler("loss", batch_size=2, presample_size=4, tau_threshold=1.0, uniform_mix=0.2)
    s.setup(4)
    s.table.update(torch.arange(4), torch.tensor([1e-9, 1.0, 1.0, 1.0]), step=0)
    s.switch.tau = 5.0
    weights = {}
    for _ in range(100):
        chosen = s.select(None, presample_of(torch.arange(4)), cross_entropy)
        weights.update(zip(chosen.indices.tolist(), chosen.weights.tolist(), strict=True))
    # p_0 = 0.8 * ~0 + 0.2 / 4 = 0.05: weight 1 / (4 * 0.05) = 5 = 1 / uniform_mix, not ~1e9
    assert weights[0] == pytest.approx(5.0, rel=1e-4)
    # the others: p = 0.8 / 3 + 0.05, weight 1 / (4 p)
    assert weights[1] == pytest.approx(1 / (4 * (0.8 / 3 + 0.05)), rel=1e-4)


def test_history_sampler_tau_is_the_mixtures():
    s = HistorySampler("loss", batch_size=2, presample_size=4, uniform_mix=0.3, tau_momentum=0.0)
    s.setup(4)
    scores = torch.tensor([0.5, 1.0, 3.0, 0.1])
    s.update_tau(scores)
    mixture = 0.7 * scores / scores.sum() + 0.3 / 4
    assert s.tau == pytest.approx(4 * mixture.pow(2).sum().item(), rel=1e-6)


def test_history_sampler_treats_stale_scores_as_unseen():
    s = HistorySampler("loss", batch_size=1, presample_size=2, staleness=5)
    s.setup(2)
    s.table.update(torch.tensor([0]), torch.tensor([9.0]), step=0)
    s.table.update(torch.tensor([1]), torch.tensor([1.0]), step=10)
    s.steps = 10  # sample 0 was seen 10 steps ago: stale -> the mean of the fresh ones (1.0)
    torch.testing.assert_close(s.table_scores(torch.tensor([0, 1])), torch.tensor([1.0, 1.0]))


def test_selective_backprop_keeps_by_loss_percentile():
    s = SelectiveBackpropSampler(batch_size=2, beta=2.0)
    s.setup(10)
    s.history = torch.tensor([1.0, 2.0, 3.0])
    # 2.5 is >= 3 of the 4 values in [1, 2, 3, 2.5]: percentile 0.75, kept with 0.75^2
    torch.testing.assert_close(s.keep_probability(torch.tensor([2.5])), torch.tensor([0.5625]))
    torch.testing.assert_close(s.keep_probability(torch.tensor([0.0])), torch.tensor([0.25**2]))


def test_selective_backprop_trains_on_full_batches_of_the_hardest():
    n = 64
    logits = torch.zeros(n, 2)
    logits[:, 0] = torch.linspace(-5, 5, n)  # loss decreases with the index

    class Table(torch.nn.Module):
        def forward(self, x):
            return logits[x.long().squeeze(1)]

    s = SelectiveBackpropSampler(batch_size=8, beta=3.0, history_size=64)
    s.setup(n)
    x = torch.arange(n, dtype=torch.float32)[:, None]
    batches = s.batches()

    def load():
        return presample_of(next(batches), x)

    kept = [s.select(Table(), load(), cross_entropy, more=load) for _ in range(30)]
    assert all(len(k) == 8 and torch.equal(k.x[:, 0].long(), k.indices) for k in kept)
    indices = torch.cat([k.indices for k in kept])
    assert indices.float().mean() < 0.4 * n  # mostly the low indices (high loss)
    assert s.scored > 240  # more candidates were loaded than kept


def test_infobatch_prunes_below_mean_losses_and_rescales_the_kept():
    s = InfoBatchSampler(batch_size=1, prune_ratio=0.75)
    s.setup(4)
    s.table.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 10.0]), step=0)  # mean 4
    kept_weight = torch.zeros(4)
    for seed in range(400):
        s.shared = gen(seed)
        s.new_pass()
        assert 3 in s.share.tolist()  # above the mean: always kept
        kept_weight[s.share] += s.weights[s.share]
    # E[kept * weight] = (1 - r) / (1 - r) = 1 for every sample: the expected gradient is kept
    torch.testing.assert_close(kept_weight / 400, torch.ones(4), atol=0.25, rtol=0)
    s.before_step(0.9)  # past anneal: everything, weight 1
    s.new_pass()
    assert sorted(s.share.tolist()) == [0, 1, 2, 3] and torch.all(s.weights == 1)


def test_infobatch_keeps_exactly_the_share_of_below_mean_samples_and_anneals_by_passes():
    n = 100
    s = InfoBatchSampler(batch_size=10, prune_ratio=0.5, anneal=0.75, num_passes=4)
    s.setup(n)
    s.table.update(torch.arange(n), torch.arange(n, dtype=torch.float32), step=0)  # 50 below mean
    batches = s.batches()
    for pass_number in range(4):
        first = next(batches)  # starts the pass
        share = s.share.clone()
        rest = [next(batches) for _ in range(len(share) // 10 - 1)]
        assert torch.equal(torch.cat([first, *rest]), share[: 10 * (1 + len(rest))])
        if pass_number < 3:  # progress 0, 1/4, 2/4 < anneal: 25 of the 50 low-loss samples kept
            assert s.pruned == 25 and len(share) == 75 and (share < 50).sum() == 25
            low = share < 50
            assert torch.all(s.weights[share[low]] == 2) and torch.all(s.weights[share[~low]] == 1)
        else:  # 3/4 of the passes done: the last pass trains on everything, weight 1
            assert s.pruned == 0 and sorted(share.tolist()) == list(range(n))
            assert torch.all(s.weights == 1)
        for indices in [first, *rest]:  # the weights drawn with each batch go with it
            chosen = s.select(None, presample_of(indices), cross_entropy)
            assert chosen.importance == (pass_number < 3)
            torch.testing.assert_close(chosen.weights, s.weights[indices])
    assert s.passes == pytest.approx(4.0)


def test_auto_threshold_is_the_measured_cost_ratio():
    s = ImportanceSampler("upper_bound", batch_size=4, presample_size=8, tau_threshold="auto")
    s.setup(16)
    s.step_times, s.score_times = [0.010] * 5, [0.030] * 3
    s._last_call = None
    s._measure_costs(None, presample_of(torch.arange(4)), cross_entropy)
    assert s.switch.threshold == pytest.approx((0.010 + 0.030) / 0.010)
    assert s.metrics() == {
        "tau_threshold": pytest.approx(4.0),
        "cost_step_ms": pytest.approx(10.0),
        "cost_score_ms": pytest.approx(30.0),
    }


@pytest.mark.parametrize("sampler", ["online_batch", "history", "selective_backprop", "infobatch"])
def test_each_baseline_trains_through_train_py(sampler, compose, tmp_path):
    from importance_sampling.config import builder

    cfg = compose(
        f"sampler={sampler}",
        "sampler.batch_size=32",
        "trainer.time_budget=null",
        "trainer.max_steps=60",
        "trainer.eval_every_seconds=null",
        "trainer.eval_every_steps=20",
        "trainer.progress=false",
    )
    summary = builder.run(cfg, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert summary["sampler"] == sampler and summary["step"] == 60
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    if sampler in ("online_batch", "selective_backprop", "infobatch"):
        assert summary["importance_steps"] > 0


def test_auto_threshold_run_logs_costs_and_threshold(compose, tmp_path):
    from importance_sampling.config import builder

    cfg = compose(
        "sampler.tau_threshold=auto",
        "sampler.batch_size=32",
        "trainer.time_budget=null",
        "trainer.max_steps=60",
        "trainer.eval_every_seconds=null",
        "trainer.eval_every_steps=20",
        "trainer.progress=false",
    )
    builder.run(cfg, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert {"tau_threshold", "cost_step_ms", "cost_score_ms"} <= set(rows[0])
    assert float(rows[-1]["tau_threshold"]) > 1 and float(rows[-1]["cost_score_ms"]) > 0


@pytest.mark.parametrize("anneal", [0.875, 0.9])
def test_infobatch_anneals_at_the_right_pass_of_a_pass_budget(anneal, compose, tmp_path):
    """trainer.max_passes=10 (the InfoBatch paper's budget): the sampler takes its progress from
    the trainer, pass k starts at exactly k / 10 of it, so passes 1-8 prune (pass 0 has no loss
    to prune by), pass 9 starts at 0.9 >= anneal and trains on everything, and the run stops
    after exactly 10 passes of full batches (a pass's last partial batch is dropped)."""
    from importance_sampling.config import builder

    started = []
    original = InfoBatchSampler.new_pass

    def spy(self):
        original(self)
        started.append((self.completed, self.pruned, len(self.share), self.pass_progress()))

    cfg = compose(
        "sampler=infobatch",
        "sampler.batch_size=32",
        f"sampler.anneal={anneal}",
        "trainer.time_budget=null",
        "trainer.max_passes=10",
        "trainer.eval_every_seconds=null",
        "trainer.eval_every_steps=100",
        "trainer.progress=false",
        "threads=1",
    )
    InfoBatchSampler.new_pass = spy
    try:
        summary = builder.run(cfg, tmp_path)
    finally:
        InfoBatchSampler.new_pass = original
    assert [p for p, *_ in started] == list(range(10))  # no 11th pass is begun
    assert [progress for *_, progress in started] == pytest.approx([k / 10 for k in range(10)])
    assert [p for p, pruned, *_ in started if pruned] == list(range(1, 9))
    assert started[9][1] == 0 and started[9][2] == 1437
    assert summary["samples"] == sum(32 * (kept // 32) for _, _, kept, _ in started)


def test_infobatch_at_equal_passes_preset(compose):
    cfg = compose("experiment=fashion_mnist_mlp_infobatch")
    assert cfg.sampler._target_.endswith("InfoBatchSampler") and cfg.sampler.anneal == 0.875
    assert (cfg.trainer.max_passes, cfg.trainer.time_budget) == (10, None)
    assert cfg.optimizer.lr == 0.05 and cfg.model.hidden_sizes == [256, 256]
    assert (
        compose("experiment=fashion_mnist_mlp_infobatch", "sampler=uniform").sampler.get(
            "prune_ratio"
        )
        is None
    )  # the preset sets no InfoBatch option: any sampler runs at equal passes

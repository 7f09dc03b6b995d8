import itertools

import pytest
import torch

from importance_sampling.core.order import EpochOrder
from importance_sampling.core.samplers import ImportanceSampler, Presample, UniformSampler
from importance_sampling.core.sampling import (
    NonFiniteScoresError,
    VarianceReductionSwitch,
    default_tau_threshold,
    equivalent_batch_increment,
    importance_probabilities,
    importance_weights,
    resample,
    score_sums,
    tau_from_sums,
)
from importance_sampling.core.scores import cross_entropy


def tau_as_written_in_the_paper(g):
    """1 / (1 - ||g - u||^2 / ||g||^2), docs/method.md."""
    u = torch.full_like(g, 1 / len(g))
    return 1 / (1 - (g - u).pow(2).sum() / g.pow(2).sum())


@pytest.mark.parametrize("b", [1, 2, 3])
def test_weighted_estimator_is_unbiased_by_exact_enumeration(b):
    torch.manual_seed(0)
    B = 4
    v = torch.randn(B, 3, dtype=torch.float64)  # per-sample gradients of the presample
    probs = importance_probabilities(torch.tensor([0.1, 2.0, 0.7, 1.2], dtype=torch.float64))
    expectation = torch.zeros(3, dtype=torch.float64)
    for draw in itertools.product(range(B), repeat=b):  # every ordered draw with replacement
        pos = torch.tensor(draw)
        p_draw = probs[pos].prod()
        estimate = (importance_weights(probs, pos)[:, None] * v[pos]).mean(0)
        expectation += p_draw * estimate
    torch.testing.assert_close(expectation, v.mean(0))


def test_resample_draws_with_the_given_probabilities_and_weights():
    probs = importance_probabilities(torch.tensor([1.0, 3.0, 0.0, 4.0]))
    gen = torch.Generator().manual_seed(0)
    pos, w = resample(probs, 80_000, gen)
    freq = torch.bincount(pos, minlength=4).float() / len(pos)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert 2 not in pos  # a zero score is never drawn
    torch.testing.assert_close(w, 1 / (4 * probs[pos]))


def test_monte_carlo_gradient_of_the_weighted_loss_is_unbiased():
    """Through a real model: averaged over many resamples, the weighted minibatch gradient equals
    the mean gradient over the presample."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))

    def grad_of(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    full = grad_of(cross_entropy(model(x), y).mean())
    probs = importance_probabilities(torch.tensor([0.5, 1, 2, 4, 0.2, 1], dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    draws = [resample(probs, 2, gen) for _ in range(4000)]
    mean = torch.stack(
        [grad_of((w * cross_entropy(model(x[p]), y[p])).mean()) for p, w in draws]
    ).mean(0)
    assert (mean - full).norm() < 0.03 * full.norm()


def test_tau_matches_the_paper_formula_and_is_one_for_uniform_scores():
    g = importance_probabilities(torch.tensor([0.3, 1.0, 2.5, 0.1, 0.9], dtype=torch.float64))
    torch.testing.assert_close(equivalent_batch_increment(g), tau_as_written_in_the_paper(g))
    torch.testing.assert_close(
        equivalent_batch_increment(g, "std"), tau_as_written_in_the_paper(g).sqrt()
    )
    uniform = importance_probabilities(torch.ones(7))
    assert equivalent_batch_increment(uniform).item() == pytest.approx(1.0)
    one_hot = importance_probabilities(torch.tensor([0.0, 0, 5, 0]))
    assert equivalent_batch_increment(one_hot).item() == pytest.approx(4.0)  # = B


def test_default_threshold_is_the_cost_ratio():
    assert default_tau_threshold(batch_size=128, presample_size=384) == pytest.approx(2.0)
    assert default_tau_threshold(batch_size=10, presample_size=60) == pytest.approx(3.0)


def test_switch_turns_on_and_off():
    switch = VarianceReductionSwitch(threshold=1.5, momentum=0.5)
    assert not switch.on and switch.tau == 0  # Algorithm 1 starts uniform
    switch.update(3.0)  # 1.5: not strictly above
    assert not switch.on
    switch.update(3.0)  # 2.25
    assert switch.on and switch.tau == pytest.approx(2.25)
    for _ in range(3):
        switch.update(torch.tensor(1.0))  # a tensor (on the device) is read when next needed
    assert not switch.on and switch.tau == pytest.approx(1.15625)
    assert isinstance(switch.tau, float)
    assert switch.state_dict() == {"tau": switch.tau, "decision": False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_switch_decides_one_step_late_without_waiting():
    switch = VarianceReductionSwitch(threshold=1.5, momentum=0.0)
    switch.update(torch.tensor(3.0, device="cuda"))  # on, from now
    assert not switch.on  # the decision of the update before: still off
    switch.update(torch.tensor(1.0, device="cuda"))
    assert switch.on  # ... now the first update's decision
    state = switch.state_dict()
    assert state == {"tau": 1.0, "decision": True, "pending": False}
    resumed = VarianceReductionSwitch(threshold=1.5, momentum=0.0)
    resumed.load_state_dict(state)
    resumed.update(torch.tensor(3.0, device="cuda"))
    switch.update(torch.tensor(3.0, device="cuda"))
    assert resumed.on == switch.on is False  # the same next decision as the uninterrupted one


def test_all_zero_scores_fall_back_to_uniform_and_non_finite_scores_raise():
    torch.testing.assert_close(importance_probabilities(torch.zeros(4)), torch.full((4,), 0.25))
    with pytest.raises(NonFiniteScoresError, match="1 of 3"):
        importance_probabilities(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(NonFiniteScoresError):
        importance_probabilities(torch.tensor([1.0, float("inf")]))


def test_unchecked_probabilities_match_the_checked_ones_without_a_sync():
    scores = torch.tensor([0.5, 0.0, 2.0, 1.5])
    torch.testing.assert_close(
        importance_probabilities(scores, check=False), importance_probabilities(scores)
    )
    torch.testing.assert_close(
        importance_probabilities(torch.zeros(4), check=False), torch.full((4,), 0.25)
    )
    # unchecked, a NaN score propagates (the switch raises when it reads the NaN tau)
    assert importance_probabilities(torch.tensor([1.0, float("nan")]), check=False).isnan().any()


def test_tau_from_score_sums_is_b_sum_g_squared_and_adds_up_over_ranks():
    """What data-parallel ranks all-reduce: [sum s, sum s^2, n] of each rank's scores gives the
    tau of the combined presample."""
    scores = torch.tensor([0.3, 1.0, 2.5, 0.1, 0.9, 4.0], dtype=torch.float64)
    g = importance_probabilities(scores).double()
    for kind in ("variance", "std"):
        torch.testing.assert_close(
            tau_from_sums(score_sums(scores), len(scores), kind),
            equivalent_batch_increment(g, kind),
        )
        halves = score_sums(scores[:3]) + score_sums(scores[3:])  # two ranks' sums, added
        torch.testing.assert_close(
            tau_from_sums(halves, 6, kind), tau_from_sums(score_sums(scores), 6, kind)
        )
    assert tau_from_sums(score_sums(torch.zeros(5)), 5).item() == 1.0  # all zero: uniform
    assert tau_from_sums(score_sums(torch.tensor([1.0, float("nan")])), 2).isnan()


def test_epoch_order_is_a_seeded_permutation_per_epoch_for_any_batch_size():
    order = EpochOrder(10, seed=3)
    first = torch.cat([order.take(5), order.take(5)])
    assert sorted(first.tolist()) == list(range(10))
    assert order.passes == 1.0 and len(order.take(7)) == 7  # a new permutation once used up
    assert order.epoch == 1 and not torch.equal(order._share[:7], first[:7])
    again = EpochOrder(10, seed=3)
    assert torch.equal(torch.cat([again.take(4), again.take(6)]), first)  # the seed fixes it
    again.load_state_dict(order.state_dict())  # the position is two integers
    assert torch.equal(again.take(3), order.take(3))


def test_epoch_order_shards_are_disjoint_cover_the_data_and_change_with_the_epoch():
    n, world = 11, 3  # 11 = 3 x 3 + 2: the 2 last of each epoch's permutation are dropped
    orders = [EpochOrder(n, seed=0, rank=r, world_size=world) for r in range(world)]
    single = EpochOrder(n, seed=0)
    shares = []
    for epoch in range(2):
        chunks = [torch.cat([o.take(2), o.take(1)]) for o in orders]  # 3 = n // world each
        flat = torch.cat(chunks)
        assert len(set(flat.tolist())) == 9  # disjoint
        # the W chunks of a step are W k consecutive entries of the one permutation
        perm = single._make_share() if epoch == 0 else None
        if perm is not None:
            torch.testing.assert_close(torch.stack(chunks, 1).flatten()[:6], perm[:6])
        shares.append([set(c.tolist()) for c in chunks])
        single.epoch += 1
    assert shares[0] != shares[1]  # reshuffled per epoch
    assert all(o.epoch == 1 for o in orders)  # every rank rolls over at the same step


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=64, presample_size=32), "presample_size"),
        (dict(tau_threshold=0.5), "tau_threshold"),
        (dict(tau_momentum=1.0), "tau_momentum"),
        (dict(score="entropy"), "score"),
        (dict(tau_kind="cubic"), "tau_kind"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_invalid_sampler_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImportanceSampler(**kwargs)


def test_batch_or_presample_larger_than_the_dataset_is_an_error():
    with pytest.raises(ValueError, match="larger than the training set"):
        UniformSampler(batch_size=50).setup(40)
    with pytest.raises(ValueError, match="presample_size=120 is larger"):
        ImportanceSampler(batch_size=20, presample_size=120).setup(100)
    with pytest.raises(ValueError, match="presample_size .B=32. must be larger"):
        ImportanceSampler(batch_size=32, presample_size=32)


class Scripted(torch.nn.Module):
    """A 'model' whose logits are a fixed function of the sample index (stored in x)."""

    def __init__(self, logits):
        super().__init__()
        self.table = logits

    def forward(self, x):
        return self.table[x.long().squeeze(1)]


def load(sampler, x, y):
    """The next presample the sampler's index stream asks for."""
    idx = next(sampler.batches())
    return Presample(x[idx], y[idx], idx)


def test_importance_sampler_picks_high_score_points_and_weights_them():
    n = 40
    y = torch.zeros(n, dtype=torch.long)
    logits = torch.zeros(n, 3)
    logits[:, 0] = 10.0  # confident and right: upper bound ~ 0
    logits[:4, 0], logits[:4, 1] = -10.0, 10.0  # points 0..3 confidently wrong: large score
    x = torch.arange(n, dtype=torch.float32)[:, None]
    sampler = ImportanceSampler("upper_bound", batch_size=8, presample_size=40, tau_threshold=1.0)
    sampler.setup(n)
    sampler.switch.tau = 5.0  # switched on: the index stream asks for B points
    presample = load(sampler, x, y)
    assert len(presample) == 40
    chosen = sampler.select(Scripted(logits), presample, cross_entropy)
    assert chosen.importance and set(chosen.indices.tolist()) <= {0, 1, 2, 3}
    assert torch.equal(chosen.x[:, 0].long(), chosen.indices)  # the trained views are the scored
    # four equal scores out of B=40: g = 1/4 each, w = 1/(B g) = 0.1
    torch.testing.assert_close(chosen.weights, torch.full((8,), 0.1), rtol=1e-3, atol=0)
    assert sampler.tau > 5.0 * 0.9  # tau_hat = B sum g^2 = 10 pushed the average up
    assert sampler.scored == 40


def test_uniform_steps_update_tau_from_the_batch_forward_pass():
    sampler = ImportanceSampler("loss", batch_size=4, presample_size=8, tau_momentum=0.0)
    sampler.setup(8)
    chosen = sampler.select(
        None, load(sampler, torch.zeros(8, 1), torch.zeros(8, dtype=torch.long)), cross_entropy
    )
    assert not chosen.importance and chosen.weights is None and len(chosen) == 4
    logits = torch.zeros(4, 2)
    sampler.update(chosen, logits, cross_entropy)
    assert sampler.tau == pytest.approx(1.0)  # equal losses: no variance to reduce


def test_tau_kept_on_the_host_or_on_the_device_is_the_same():
    """The CPU keeps tau a float (reading it is free); a GPU keeps it on the device."""
    scores = [
        torch.tensor([0.2, 1.0, 3.0, 0.5]),
        torch.zeros(4),
        torch.tensor([1.0, 1.0, 2.0, 9.0]),
    ]
    results = []
    for on_host in (True, False):
        sampler = ImportanceSampler("loss", batch_size=2, presample_size=4, tau_momentum=0.5)
        sampler.setup(8)
        sampler.tau_on_host = on_host
        for s in scores:
            sampler.update_tau(s)
        presample = Presample(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.arange(4))
        sampler.draw(presample, torch.ones(4))  # equal scores: a fallback
        results.append((sampler.tau, sampler.fallbacks, bool(sampler.finite)))
    assert results[0] == pytest.approx(results[1]) and results[0][1] == 1
    sampler.update_tau(torch.tensor([1.0, float("nan")]))
    assert not bool(sampler.finite)


def test_b_and_b_big_are_global_and_must_divide_among_the_processes():
    from importance_sampling.core.collectives import Distributed

    sampler = ImportanceSampler("upper_bound", batch_size=64, presample_size=192)
    sampler.setup(1000, dist=Distributed(rank=1, world_size=4))
    assert (sampler.batch_r, sampler.presample_r) == (16, 48)  # each process's share
    with pytest.raises(ValueError, match="sampler.batch_size=64 is not divisible by the 3 proc"):
        ImportanceSampler("upper_bound", batch_size=64).setup(1000, dist=Distributed(0, 3))
    with pytest.raises(ValueError, match="sampler.presample_size=191 is not divisible by the 2"):
        ImportanceSampler("upper_bound", 64, presample_size=191).setup(1000, dist=Distributed(0, 2))

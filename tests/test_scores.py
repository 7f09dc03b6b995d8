import math

import pytest
import torch
import torch.nn.functional as F

from importance_sampling.core.grad_norms import (
    gradient_norm_scores,
    gradient_norm_scores_vmap,
    per_sample_gradients,
)
from importance_sampling.core.scores import cross_entropy, loss_scores, mse, upper_bound_scores
from importance_sampling.engine.models import CNN, MLP


def autograd_logit_grad_norms(logits, targets, loss_fn):
    z = logits.clone().requires_grad_(True)
    norms = []
    for i in range(len(z)):
        (g,) = torch.autograd.grad(loss_fn(z[i : i + 1], targets[i : i + 1]).sum(), z)
        norms.append(g[i].norm())
    return torch.stack(norms)


def test_upper_bound_closed_form_matches_autograd_for_cross_entropy():
    torch.manual_seed(0)
    logits, targets = 3 * torch.randn(17, 7), torch.randint(0, 7, (17,))
    expected = autograd_logit_grad_norms(logits, targets, cross_entropy)
    torch.testing.assert_close(upper_bound_scores(logits, targets, cross_entropy), expected)


def test_upper_bound_closed_form_matches_autograd_for_mse():
    torch.manual_seed(0)
    outputs, targets = torch.randn(9, 4), torch.randn(9, 4)
    expected = autograd_logit_grad_norms(outputs, targets, mse)
    torch.testing.assert_close(upper_bound_scores(outputs, targets, mse), expected)


def test_upper_bound_uses_autograd_on_logits_for_any_other_loss():
    def smoothed_ce(z, y):  # not one of the closed forms
        return F.cross_entropy(z, y, reduction="none", label_smoothing=0.1)

    torch.manual_seed(0)
    logits, targets = torch.randn(11, 5), torch.randint(0, 5, (11,))
    expected = autograd_logit_grad_norms(logits, targets, smoothed_ce)
    torch.testing.assert_close(upper_bound_scores(logits, targets, smoothed_ce), expected)
    # Scoring never needs the graph of the network: it works on inference tensors too.
    with torch.inference_mode():
        frozen = logits.clone()
    torch.testing.assert_close(upper_bound_scores(frozen, targets, smoothed_ce), expected)


def test_loss_scores_are_per_sample_losses():
    logits, targets = torch.randn(6, 3), torch.randint(0, 3, (6,))
    torch.testing.assert_close(
        loss_scores(logits, targets), F.cross_entropy(logits, targets, reduction="none")
    )


def per_sample_loop(model, x, y):
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        cross_entropy(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: MLP((1, 8, 8), 10, hidden_sizes=(16, 12)),
        lambda: CNN((1, 8, 8), 10, channels=(4, 6), hidden_size=8),
    ],
)
def test_gradient_norms_match_a_per_sample_backward_loop(make_model):
    torch.manual_seed(0)
    model = make_model()
    x, y = torch.randn(13, 1, 8, 8), torch.randint(0, 10, (13,))
    expected = per_sample_loop(model, x, y)
    # chunk_size=5 splits the 13 samples into uneven chunks
    torch.testing.assert_close(per_sample_gradients(model, x, y, chunk_size=5), expected)
    torch.testing.assert_close(
        gradient_norm_scores(model, x, y, chunk_size=5), expected.norm(dim=1)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a CUDA step: the oracle stays fp32
        torch.testing.assert_close(
            gradient_norm_scores(model, x, y, chunk_size=5), expected.norm(dim=1)
        )


def test_upper_bound_orders_samples_like_the_last_layer_gradient():
    """For a linear model the gradient is x (dL/dz)^T: its norm is ||x|| * ||dL/dz|| exactly."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4, bias=False)
    x = torch.randn(10, 6)
    x = x / x.norm(dim=1, keepdim=True)  # unit inputs: gradient norm == upper bound
    y = torch.randint(0, 4, (10,))
    torch.testing.assert_close(
        gradient_norm_scores(model, x, y), upper_bound_scores(model(x), y), rtol=1e-5, atol=1e-6
    )


def test_loss_scores_are_never_zero_for_a_sample_whose_gradient_is_not_zero():
    # margins of 20, 40 and 90: the float32 loss rounds to exactly 0 (log(1 + e^-20) < 2^-24 ...)
    # while the float32 gradient softmax(z) - e_y is not 0 (e^-90 ~ 8e-40 is a float32 subnormal)
    logits = torch.tensor([[20.0, 0.0, 0.0], [0.0, 40.0, 0.0], [0.0, 0.0, 90.0], [1.0, 2.0, 3.0]])
    targets = torch.tensor([0, 1, 2, 0])
    assert (F.cross_entropy(logits, targets, reduction="none")[:3] == 0).all()
    gradient = torch.softmax(logits, 1)  # dL/dz_j = softmax(z)_j for j != y: not 0
    assert (gradient[:3].min(1).values > 0).all()
    scores = loss_scores(logits, targets)
    assert scores.dtype == torch.float32 and (scores > 0).all()
    exact = torch.log1p(2 * torch.exp(torch.tensor([-20.0, -40.0], dtype=torch.float64)))
    torch.testing.assert_close(scores[:2].double(), exact, rtol=1e-6, atol=0)
    assert scores[2] == torch.finfo(torch.float32).tiny  # e^-90: below float32's normal range
    torch.testing.assert_close(scores[3], F.cross_entropy(logits[3:], targets[3:]))
    # a sample whose gradient is exactly 0 in float64 too (one class only) scores 0
    assert loss_scores(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)).eq(0).all()


def test_other_loss_scores_are_computed_in_float64():
    outputs, targets = torch.tensor([[1e-30, 0.0], [1.0, 0.0]]), torch.zeros(2, 2)
    assert mse(outputs, targets)[0] == 0  # (1e-30)^2 underflows in float32 ...
    assert outputs[0, 0] - targets[0, 0] != 0  # ... its gradient (z - y) does not
    scores = loss_scores(outputs, targets, mse)
    assert (scores > 0).all() and scores[1] == 0.5


def test_a_float64_model_is_scored_in_float64():
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 10, channels=(4, 6), hidden_size=8).double()
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    rows = []
    for i in range(5):
        model.zero_grad()
        cross_entropy(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    expected = torch.stack(rows).norm(dim=1)
    for norms in (gradient_norm_scores(model, x, y), gradient_norm_scores_vmap(model, x, y)):
        assert norms.dtype == torch.float64
        torch.testing.assert_close(norms, expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- precision on confident points
def exact_upper_bound(logits: list[float], target: int) -> float:
    """||softmax(z) - e_y|| with 60 significant digits (mpmath), for float logits."""
    import mpmath

    mpmath.mp.dps = 60
    z = [mpmath.mpf(float(v)) for v in logits]
    top = max(z)
    e = [mpmath.exp(v - top) for v in z]
    total = mpmath.fsum(e)
    p = [v / total for v in e]
    miss = mpmath.fsum(p[j] for j in range(len(p)) if j != target)  # 1 - p_y, exactly
    return float(
        mpmath.sqrt(miss**2 + mpmath.fsum(p[j] ** 2 for j in range(len(p)) if j != target))
    )


@pytest.mark.parametrize(
    "dtype, margins",
    [(torch.float64, [0, 1, 5, 15, 30, 55, 80, 100]), (torch.float32, [0, 1, 5, 15, 20, 30])],
)
def test_upper_bound_keeps_its_relative_precision_on_confident_points(dtype, margins):
    """A point predicted right with a margin of m nats has a score of about e^-m: float64 logits
    keep it to 1e-6 relative up to 100 nats, float32 logits up to 30 (the score is then ~1e-13),
    and it is never 0 while its gradient is not."""
    torch.manual_seed(0)
    for classes in (2, 10):
        rows, targets = [], []
        for m in margins:
            row = -(m + torch.rand(classes, dtype=torch.float64))  # the others, m+ nats below
            y = int(torch.randint(classes, ()))
            row[y] = 0.0
            rows.append(row + 3.0)  # shifted: only differences matter
            targets.append(y)
        logits = torch.stack(rows).to(dtype)
        scores = upper_bound_scores(logits, torch.tensor(targets))
        assert scores.dtype == dtype
        exact = torch.tensor(
            [exact_upper_bound(r.tolist(), t) for r, t in zip(logits, targets, strict=True)],
            dtype=torch.float64,
        )
        relative = ((scores.double() - exact) / exact).abs()
        assert relative.max() <= 1e-6, relative
        assert (scores > 0).all()


def test_upper_bound_is_zero_only_where_the_gradient_is_and_never_for_a_float32_model():
    # 200 nats: e^-200 is below float32's range; the score is raised to its smallest normal
    logits = torch.tensor([[200.0, 0.0, 0.0]])
    score = upper_bound_scores(logits, torch.tensor([0]))
    assert score.dtype == torch.float32 and score.item() == torch.finfo(torch.float32).tiny
    # in float64 it is e^-200 sqrt(2) times 1 + tiny, exactly representable
    score64 = upper_bound_scores(logits.double(), torch.tensor([0]))
    assert score64.item() == pytest.approx(exact_upper_bound([200.0, 0.0, 0.0], 0), rel=1e-12)
    # a wrong prediction: the score is about sqrt(2), no cancellation either way
    wrong = upper_bound_scores(torch.tensor([[0.0, 40.0]]), torch.tensor([0]))
    assert wrong.item() == pytest.approx(2**0.5, rel=1e-6)


def test_mse_bound_keeps_its_relative_precision_when_outputs_are_near_the_targets():
    """(2/d)||z - y||: outputs one float32 step from their targets give the exact difference."""
    targets = torch.tensor([[1.0, -3.0], [1e4, 2.0]])
    outputs = torch.nextafter(targets, torch.full_like(targets, math.inf))  # one ulp above
    scores = upper_bound_scores(outputs, targets, mse)
    diff = outputs.double() - targets.double()
    exact = (2.0 / 2) * diff.norm(dim=1)
    torch.testing.assert_close(scores.double(), exact, rtol=1e-7, atol=0)
    assert (scores > 0).all()

import pytest
import torch
import torch.nn.functional as F

from importance_sampling.models import CNN, MLP
from importance_sampling.scores import (
    cross_entropy,
    gradient_norm_scores,
    loss_scores,
    mse,
    per_sample_gradients,
    upper_bound_scores,
)


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

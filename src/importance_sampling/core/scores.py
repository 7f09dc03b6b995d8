"""Per-sample importance scores (docs/method.md, "Why sample by gradient norm", "The upper bound").

Every score maps a batch to a non-negative tensor of shape (n,):

- ``loss_scores``           L_i, the per-sample loss (the common heuristic);
- ``upper_bound_scores``    ||dL_i/dz_i||_2 with z the last layer's pre-activation output (logits):
                            the paper's bound, which needs only a forward pass;

and, in grad_norms.py, ``gradient_norm_scores``: ||grad_theta L_i||_2 over all parameters (the
optimal distribution), exact, from one forward + backward over the points.

A *loss function* here is any callable ``loss_fn(outputs, targets) -> (n,)`` that returns the
per-sample (unreduced) loss, e.g. ``functools.partial(F.cross_entropy, reduction="none")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs (n, ...), targets (n,)) -> losses (n,)


def _at_least_float32(x: Tensor) -> Tensor:
    """bf16 / fp16 -> float32 (losses are not computed in half precision); float64 stays."""
    return x if x.dtype == torch.float64 else x.float()


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample softmax cross-entropy, shape (n,). The default loss of every classifier here."""
    return F.cross_entropy(_at_least_float32(logits), targets, reduction="none")


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample mean squared error over the output dimension d, shape (n,)."""
    outputs = _at_least_float32(outputs)
    return (outputs - targets.to(outputs.dtype)).pow(2).flatten(1).mean(1)


def loss_scores(logits: Tensor, targets: Tensor, loss_fn: LossFn = cross_entropy) -> Tensor:
    """The per-sample loss L_i as a score, shape (n,), float32, and never 0 for a sample whose
    gradient is not 0.

    A confidently right sample's float32 cross-entropy rounds to exactly 0 (log(1 + s) with
    s < 6e-8) while its gradient (~s) is not 0: the loss sampler would never draw it, a bias. So
    the loss is computed in float64, for cross-entropy in the form log1p(sum_{j != y}
    exp(z_j - z_y)) (exact down to s ~ 1e-308, far below where the float32 gradient underflows),
    and a positive loss below float32's range is raised to its smallest normal number (1.2e-38).
    """
    logits = logits.detach()
    if loss_fn is cross_entropy:
        losses = _stable_cross_entropy(logits.double(), targets)
    else:
        losses = loss_fn(logits.double(), targets).double()
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(losses > 0, losses.clamp(min=tiny), losses).float()


def _stable_cross_entropy(z: Tensor, targets: Tensor) -> Tensor:
    """-log softmax(z)_y, shape (n,), accurate also when it is tiny: with d_j = z_j - z_y, it is
    log1p(sum_{j != y} exp(d_j)) when every d_j <= 0 (no overflow, no rounding of 1 + s), and
    logsumexp(d) (>= max d > 0, no cancellation) otherwise."""
    d = z - z.gather(1, targets.view(-1, 1))
    others = d.scatter(1, targets.view(-1, 1), -math.inf)  # exp(-inf) = 0: j = y left out
    small = torch.log1p(others.clamp(max=0).exp().sum(1))
    return torch.where(others.amax(1) <= 0, small, torch.logsumexp(d, 1))


def upper_bound_scores(logits: Tensor, targets: Tensor, loss_fn: LossFn = cross_entropy) -> Tensor:
    """G_hat_i = ||dL_i/dz_i||_2, the paper's upper bound (up to a constant), shape (n,), in the
    logits' precision (float64 for float64 logits, float32 otherwise), with its relative
    precision kept for every point: 0 only when the gradient is.

    Closed forms for softmax cross-entropy and MSE ((2/d)(z - y)), computed in float64; for any
    other per-sample loss the gradient is taken by autograd on z alone (z is detached from the
    network, so there is never a backward pass through the network).

    Softmax cross-entropy: dL/dz = softmax(z) - e_y, whose entry at y is p_y - 1. For a point
    the network is sure of, p_y rounds to 1 and p_y - 1 keeps no correct digit (at a margin of 15
    nats float32 is 37% off; from about 55 nats the score is 0 and the point can never be drawn,
    a bias). So 1 - p_y is computed as the sum of the other classes' probabilities, each from
    its log-probability, which keeps its precision however small it is. A positive score below
    float32's smallest normal number is raised to it (as loss scores are), so that a float32
    model's point with a non-zero gradient is never given probability 0.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.detach().double()
    if loss_fn is cross_entropy:
        others = torch.log_softmax(z, dim=1).scatter(1, targets.view(-1, 1), -math.inf).exp()
        miss = others.sum(1)  # 1 - p_y, the gradient's entry at y (in absolute value)
        # ||(p_j)_{j != y}, 1 - p_y|| = (1 - p_y) sqrt(1 + sum_j (p_j / (1 - p_y))^2): no square
        # of a tiny number underflows
        ratio = others / miss.clamp(min=torch.finfo(torch.float64).tiny)[:, None]
        scores = miss * torch.sqrt(1.0 + ratio.square().sum(1))
    elif loss_fn is mse:
        d = z[0].numel()
        scores = (2.0 / d) * (z - targets.double()).flatten(1).norm(dim=1)
    else:
        with torch.enable_grad(), torch.inference_mode(False):
            z = z.clone().requires_grad_(True)
            # The loss of sample i depends only on z_i, so d(sum_j L_j)/dz_i = dL_i/dz_i.
            (dz,) = torch.autograd.grad(loss_fn(z, targets).sum(), z)
        scores = dz.double().flatten(1).norm(dim=1)
    if dtype == torch.float32:
        tiny = torch.finfo(torch.float32).tiny
        scores = torch.where(scores > 0, scores.clamp(min=tiny), scores)
    return scores.to(dtype)

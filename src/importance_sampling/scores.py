"""Per-sample importance scores (docs/method.md, "Why sample by gradient norm", "The upper bound").

Every score maps a batch to a non-negative tensor of shape (n,):

- ``loss_scores``           L_i, the per-sample loss (the common heuristic);
- ``upper_bound_scores``    ||dL_i/dz_i||_2 with z the last layer's pre-activation output (logits):
                            the paper's bound, which needs only a forward pass;
- ``gradient_norm_scores``  ||grad_theta L_i||_2 over all parameters (the optimal distribution,
                            one backward per sample: the expensive oracle).

A *loss function* here is any callable ``loss_fn(outputs, targets) -> (n,)`` that returns the
per-sample (unreduced) loss, e.g. ``functools.partial(F.cross_entropy, reduction="none")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample softmax cross-entropy, shape (n,). The default loss of every classifier here."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample mean squared error over the output dimension d, shape (n,)."""
    return (outputs.float() - targets.float()).pow(2).flatten(1).mean(1)


def loss_scores(logits: Tensor, targets: Tensor, loss_fn: LossFn = cross_entropy) -> Tensor:
    """The per-sample loss L_i as a score, shape (n,)."""
    return loss_fn(logits.detach(), targets).float()


def upper_bound_scores(logits: Tensor, targets: Tensor, loss_fn: LossFn = cross_entropy) -> Tensor:
    """G_hat_i = ||dL_i/dz_i||_2, the paper's upper bound (up to a constant), shape (n,).

    Closed forms for softmax cross-entropy (softmax(z) - e_y) and MSE ((2/d)(z - y)); for any
    other per-sample loss the gradient is taken by autograd on z alone (z is detached from the
    network, so there is never a backward pass through the network).
    """
    z = logits.detach().float()
    if loss_fn is cross_entropy:
        residual = torch.softmax(z, dim=1)
        residual[torch.arange(len(z), device=z.device), targets] -= 1.0
        return residual.norm(dim=1)
    if loss_fn is mse:
        d = z[0].numel()
        return (2.0 / d) * (z - targets.float()).flatten(1).norm(dim=1)
    with torch.enable_grad(), torch.inference_mode(False):
        z = z.clone().requires_grad_(True)
        # The loss of sample i depends only on z_i, so d(sum_j L_j)/dz_i = dL_i/dz_i.
        (dz,) = torch.autograd.grad(loss_fn(z, targets).sum(), z)
    return dz.flatten(1).norm(dim=1)


def _per_sample_gradient_chunks(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, chunk_size: int
) -> Iterator[dict[str, Tensor]]:
    """Yield per-sample gradients, {param name: (chunk, *param.shape)}, chunk by chunk."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: use the original
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    # float32 even inside a bf16 autocast step: this is the exact oracle the others are judged by
    no_autocast = torch.autocast(inputs.device.type, enabled=False)
    with torch.enable_grad(), torch.inference_mode(False), no_autocast:
        for start in range(0, len(inputs), chunk_size):
            end = start + chunk_size
            x = inputs[start:end]
            x = x.float() if x.is_floating_point() else x
            yield per_sample_grads(params, x, targets[start:end])


def gradient_norm_scores(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = cross_entropy,
    chunk_size: int = 256,
) -> Tensor:
    """Exact per-sample gradient norms ||grad_theta L_i||_2 over all trainable parameters, shape (n,).

    torch.func (vmap of grad over a functional call) in chunks of ``chunk_size`` samples, so
    memory stays bounded by chunk_size copies of the gradient. Call it with the model in eval
    mode if it has batch-dependent layers (BatchNorm): a per-sample gradient needs each sample's
    output to depend on that sample only. Computed in float32, also under autocast.
    """
    chunks = _per_sample_gradient_chunks(model, inputs, targets, loss_fn, chunk_size)
    return torch.cat(
        [sum(t.float().pow(2).flatten(1).sum(1) for t in g.values()).sqrt() for g in chunks]
    )


def per_sample_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = cross_entropy,
    chunk_size: int = 256,
) -> Tensor:
    """Flattened per-sample gradients over all trainable parameters, shape (n, num_params)."""
    chunks = _per_sample_gradient_chunks(model, inputs, targets, loss_fn, chunk_size)
    return torch.cat([torch.cat([t.float().flatten(1) for t in g.values()], 1) for g in chunks])

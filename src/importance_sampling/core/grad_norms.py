"""Exact per-sample gradient norms from one ordinary forward + backward pass (module hooks).

For sample i of a batch, the gradient of its loss L_i with respect to a layer's weight is a sum
over the positions t where the weight is applied (time steps, pixels, tokens, calls) of an outer
product of that layer's input a_it and the gradient delta_it = dL/d(output_it):

    dL_i/dW = sum_t delta_it a_it^T,   ||dL_i/dW||^2 = sum_{t,s} (a_it . a_is)(delta_it . delta_is).

A forward hook keeps each parametrised layer's input, a tensor hook on its output receives
delta from the ordinary backward pass over the batch, and the closed forms below turn (a, delta)
into ||dL_i/dW||^2 without forming per-sample gradients where that is cheaper (the Gram form
above costs T^2 (p + q) per sample against T p q for the materialised p x q gradient: the cheaper
is chosen per layer). Closed forms: Linear (any leading dims), Conv1d/Conv2d (stride, padding,
dilation, groups, padding modes; three exact forms picked by the layer's sizes, see ``_conv``),
BatchNorm, LayerNorm, GroupNorm, Embedding (rows of equal tokens summed), nn.LSTM (the gate
gradients by the backward recurrence written out, see ``_lstm``). Any other module that owns
trainable parameters falls back to torch.func for that module only (vmap of a per-sample
vector-Jacobian product), with one warning naming its type.

Exactness needs what any per-sample gradient needs: sample i's output depends on sample i only.
A BatchNorm in train mode mixes the samples of the batch; there the result is the squared norm
of the part of the batch gradient that flows through sample i's own activations (these parts
sum to the batch gradient), which is not ||grad L_i|| (score BatchNorm networks in eval mode).
Parameters must be used through their module's forward (a weight read directly elsewhere, e.g.
``x @ emb.weight.T``, is not seen); a parameter shared by several modules or a module called
several times is exact (its per-sample gradients are summed over the uses before the norm).
Frozen parameters (requires_grad=False) are excluded.

Two entry points:

- ``gradient_norm_scores(model, inputs, targets, loss_fn, chunk_size)`` -> (n,): the exact
  ||grad_theta L_i||_2 over all trainable parameters, chunk by chunk (one forward + one backward
  per chunk, no parameter .grad touched, autocast off, in the model's dtype);
- ``GradNormRecorder(model)``: a context manager around the forward of the caller's own step;
  after the caller's ``loss.backward()``, ``squared_norms()`` (n,) is each sample's squared norm
  of its contribution to that backward. For loss = mean_i w_i L_i over n samples this is
  (w_i / n)^2 ||grad L_i||^2. Hooks are registered only inside the ``with`` block.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten

from .scores import LossFn, cross_entropy


# ------------------------------------------------------------------ the Gram identity
@dataclass
class Factors:
    """A per-sample gradient sum_t d_t a_t^T in factored form, for each of G groups.

    a: (n, G, T, p) layer inputs at the T positions; d: (n, G, T, q) output gradients there;
    shape: the parameter's shape (G q p elements, in the order (G, q, p))."""

    a: Tensor
    d: Tensor
    shape: torch.Size

    def sq_norm(self) -> Tensor:
        """||sum_t d_t a_t^T||^2 summed over groups, shape (n,), by the cheaper of two forms."""
        a, d = self.a, self.d
        n, _, t, p = a.shape
        q = d.shape[-1]
        if t == 1:  # ||a d^T||^2 = ||a||^2 ||d||^2
            return (a.pow(2).sum(-1) * d.pow(2).sum(-1)).flatten(1).sum(1)
        if t * (p + q) < p * q:  # Gram: sum_{t,s} (a_t . a_s)(d_t . d_s)
            return ((a @ a.mT) * (d @ d.mT)).flatten(1).sum(1)
        return (d.mT @ a).pow(2).flatten(1).sum(1)

    def materialise(self) -> Tensor:
        """The per-sample gradients, shape (n, *shape)."""
        return (self.d.mT @ self.a).reshape(len(self.a), *self.shape)


# parameter name -> per-sample gradients (n, *shape), or a factored form of them (Factors,
# ConvFactors, RowSums: all have sq_norm() (n,) and materialise() (n, *shape))
PerSample = dict[str, "Tensor | Factors | ConvFactors | RowSums"]


def _sq_norm(g) -> Tensor:
    if isinstance(g, Tensor):
        return torch.linalg.vector_norm(g.flatten(1), dim=1).square()
    return g.sq_norm()


def _materialise(g) -> Tensor:
    return g if isinstance(g, Tensor) else g.materialise()


# ------------------------------------------------------------------ closed forms, per layer
# Each takes (module, args, kwargs, output grads (flat, zeros where unused), its trainable
# parameters' names, compute dtype) and returns {name: per-sample gradients, see PerSample}.


def _linear(m: nn.Linear, args, kwargs, grads, names, dtype) -> PerSample:
    (x,), (d,) = args, grads
    n = len(x)
    a = x.to(dtype).reshape(n, 1, -1, m.in_features)  # weight shared over the middle dims
    d = d.to(dtype).reshape(n, 1, -1, m.out_features)
    out: PerSample = {}
    if "weight" in names:
        out["weight"] = Factors(a, d, m.weight.shape)
    if "bias" in names:
        out["bias"] = d.sum((1, 2))
    return out


@dataclass
class ConvFactors:
    """Per-sample Conv2d weight gradients without unfolding the input.

    For kernel offset (k, l), dL_i/dW[:, :, k, l] = sum_u d_i[:, u] x_i[:, s u + dil (k, l)]^T
    (u over output positions). Laid out with a row width Wq >= Wo + the largest shift, the input
    pixels an offset reads form one contiguous (unit-stride) run of a flattened polyphase component
    of the padded input, and the output gradient rows, zero-extended to width Wq, line up with it:
    each offset is one batched matmul on a view, with no im2col copy.

    planes: (n G, P, C_in/G, Hq Wq) the polyphase components of the padded input that are read;
    d: (n G, C_out/G, Ho Wq); reads: (plane, flat offset) per kernel offset, in weight order."""

    planes: Tensor
    d: Tensor
    reads: list[tuple[int, int]]
    n: int
    shape: torch.Size

    def _blocks(self):
        length = self.d.shape[-1]
        for plane, offset in self.reads:
            x = self.planes[:, plane, :, offset : offset + length]  # (n G, C_in/G, Ho Wq)
            yield self.d @ x.mT  # (n G, C_out/G, C_in/G)

    def sq_norm(self) -> Tensor:
        total = sum(b.pow(2).sum((1, 2)) for b in self._blocks())
        return total.reshape(self.n, -1).sum(1)

    def materialise(self) -> Tensor:
        blocks = torch.stack(list(self._blocks()), -1)  # (n G, C_out/G, C_in/G, k_h k_w)
        return blocks.reshape(self.n, *self.shape)


def _zero_pad(x: Tensor, top: int, height: int, left: int, width: int) -> Tensor:
    """x (..., h, w) placed at (top, left) in zeros of shape (..., height, width). Unlike F.pad,
    only the border is zeroed (the interior is written once)."""
    h, w = x.shape[-2:]
    if (top, left, h, w) == (0, 0, height, width):
        return x
    out = x.new_empty(*x.shape[:-2], height, width)
    out[..., :top, :].zero_()
    out[..., top + h :, :].zero_()
    out[..., top : top + h, :left].zero_()
    out[..., top : top + h, left + w :].zero_()
    out[..., top : top + h, left : left + w] = x
    return out


def _conv(m: nn.Conv1d | nn.Conv2d, args, kwargs, grads, names, dtype) -> PerSample:
    (x,), (d,) = args, grads
    x, d = x.to(dtype), d.to(dtype)
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        # 'same' / 'valid' and reflect / replicate / circular: pad as the module does
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(m.kernel_size)
    else:
        padding = m.padding
    kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    if x.dim() == 3:  # Conv1d as a Conv2d of height 1
        x, d = x.unsqueeze(2), d.unsqueeze(2)
        kernel, stride, dilation = ((1, *v) for v in (kernel, stride, dilation))
        padding = (0, *padding)
    n, g = len(x), m.groups
    c, q = x.shape[1] // g, m.out_channels // g
    (ho, wo), (kh, kw), (sh, sw), (dh, dw) = d.shape[2:], kernel, stride, dilation
    out: PerSample = {}
    if "bias" in names:
        out["bias"] = d.sum((2, 3)).reshape(n, -1)
    if "weight" not in names:
        return out
    # Three exact forms; which is fastest depends on the sizes (measured on a CPU, one thread):
    positions, p = ho * wo, c * kh * kw
    if positions * (p + q) < p * q:  # few positions, wide layer: the Gram form needs fewer flops
        patches = F.unfold(x, kernel, dilation, padding, stride)  # (n, C_in k_h k_w, T)
        a = patches.reshape(n, g, p, positions).mT
        out["weight"] = Factors(a, d.reshape(n, g, q, positions).mT, m.weight.shape)
        return out
    if c * q <= 4096:  # narrow layer: the backend's weight-gradient kernel, one group per sample
        grads = torch.nn.grad.conv2d_weight(
            x.reshape(1, n * x.shape[1], *x.shape[2:]),
            (n * m.out_channels, c, kh, kw),
            d.reshape(1, n * m.out_channels, ho, wo),
            stride,
            padding,
            dilation,
            n * g,
        )
        out["weight"] = grads.reshape(n, *m.weight.shape)
        return out
    # wide layer with many positions: one matmul per kernel offset on views of the input
    offsets = [(i * dh, j * dw) for i in range(kh) for j in range(kw)]  # in weight order
    shifts = [(u // sh, v // sw) for u, v in offsets]
    phases = [(u % sh, v % sw) for u, v in offsets]
    wq = wo + max(v for _, v in shifts)
    hq = ho + max(u for u, _ in shifts) + 1  # one spare row: the last run may end past Ho rows
    pt, pl = padding
    used = sorted(set(phases))
    if (sh, sw) == (1, 1):  # one phase: the padded input itself, cropped or extended to hq x wq
        planes = _zero_pad(x[:, :, : hq - pt, : wq - pl], pt, hq, pl, wq)
    else:
        x = F.pad(x, (pl, pl, pt, pt))
        planes = x.new_zeros(n, g, len(used), c, hq, wq)
        for i, (a, b) in enumerate(used):
            part = x[:, :, a::sh, b::sw][:, :, :hq, :wq]
            planes[:, :, i, :, : part.shape[2], : part.shape[3]] = part.reshape(
                n, g, c, *part.shape[2:]
            )
    planes = planes.reshape(n * g, len(used), c, hq * wq)
    d = _zero_pad(d.reshape(n * g, q, ho, wo), 0, ho, 0, wq)
    reads = [(used.index(ph), u * wq + v) for ph, (u, v) in zip(phases, shifts, strict=True)]
    out["weight"] = ConvFactors(planes, d.reshape(n * g, q, ho * wq), reads, n, m.weight.shape)
    return out


def _affine(x_hat: Tensor, d: Tensor, names, reduce: Sequence[int], shape) -> PerSample:
    """Per-sample grads of an elementwise affine map y = weight * x_hat + bias."""
    out: PerSample = {}
    if "weight" in names:
        out["weight"] = (d * x_hat).sum(reduce).reshape(len(d), *shape) if reduce else d * x_hat
    if "bias" in names:
        out["bias"] = d.sum(reduce).reshape(len(d), *shape) if reduce else d
    return out


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, args, kwargs, grads, names, dtype):
    """Per sample: weight gets sum_pos delta * x_hat, bias sum_pos delta (channel by channel)."""
    (x,), (d,) = args, grads
    n, c = x.shape[:2]
    x, d = x.to(dtype).reshape(n, c, -1), d.to(dtype).reshape(n, c, -1)
    if m.training or m.running_mean is None:  # batch statistics (biased variance), as F.batch_norm
        mean, var = x.mean((0, 2)), x.var((0, 2), correction=0)
    else:
        mean, var = m.running_mean.to(dtype), m.running_var.to(dtype)
    out: PerSample = {}
    if "weight" in names:
        out["weight"] = (d * (x - mean.view(1, c, 1))).sum(2) * torch.rsqrt(var + m.eps)
    if "bias" in names:
        out["bias"] = d.sum(2)
    return out


def _layer_norm(m: nn.LayerNorm, args, kwargs, grads, names, dtype):
    (x,), (d,) = args, grads
    x, d = x.to(dtype), d.to(dtype)
    k = len(m.normalized_shape)
    dims = list(range(x.dim() - k, x.dim()))
    x_hat = (x - x.mean(dims, keepdim=True)) * torch.rsqrt(
        x.var(dims, correction=0, keepdim=True) + m.eps
    )
    return _affine(x_hat, d, names, list(range(1, x.dim() - k)), m.normalized_shape)


def _group_norm(m: nn.GroupNorm, args, kwargs, grads, names, dtype):
    (x,), (d,) = args, grads
    x, d = x.to(dtype), d.to(dtype)
    grouped = x.reshape(len(x), m.num_groups, -1)
    x_hat = (grouped - grouped.mean(2, keepdim=True)) * torch.rsqrt(
        grouped.var(2, correction=0, keepdim=True) + m.eps
    )
    return _affine(x_hat.reshape(x.shape), d, names, list(range(2, x.dim())), [m.num_channels])


@dataclass
class RowSums:
    """An embedding's per-sample gradients: row ``rows[k] % V`` of sample ``rows[k] // V`` holds
    ``sums[k]`` (the sum of the output gradients of that sample's tokens equal to that row)."""

    rows: Tensor  # (K,) sample * V + row, each (sample, row) used once
    sums: Tensor  # (K, D)
    n: int
    shape: torch.Size  # (V, D)

    def sq_norm(self) -> Tensor:
        v = self.shape[0]
        return self.sums.new_zeros(self.n).index_add_(0, self.rows // v, self.sums.pow(2).sum(1))

    def materialise(self) -> Tensor:
        flat = self.sums.new_zeros(self.n * self.shape[0], self.shape[1])
        return flat.index_copy_(0, self.rows, self.sums).reshape(self.n, *self.shape)


def _embedding(m: nn.Embedding, args, kwargs, grads, names, dtype) -> PerSample:
    """The per-sample gradient puts sum_{t: idx_t = v} delta_t in row v: group equal indices."""
    (idx,), (d,) = args, grads
    n, dim = len(idx), m.embedding_dim
    idx, d = idx.reshape(n, -1), d.to(dtype).reshape(n, -1, dim)
    keys = torch.arange(n, device=idx.device).unsqueeze(1) * m.num_embeddings + idx
    if m.padding_idx is not None:  # the padding row gets no gradient
        keep = idx != m.padding_idx
        keys, d = keys[keep], d[keep]
    else:
        keys, d = keys.reshape(-1), d.reshape(-1, dim)
    rows, inverse = torch.unique(keys, return_inverse=True)
    sums = d.new_zeros(len(rows), dim).index_add_(0, inverse, d)
    return {"weight": RowSums(rows, sums, n, m.weight.shape)}


def _lstm(m: nn.LSTM, args, kwargs, grads, names, dtype, output: Tensor) -> PerSample:
    """Exact per-sample LSTM gradients from the gate pre-activation gradients dz_t (n, T, 4H).

    With z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh, dL_i/dW_ih = sum_t dz_t x_t^T, dL_i/dW_hh =
    sum_t dz_t h_{t-1}^T and both biases get sum_t dz_t. The fused kernel does not expose dz, so
    it is recomputed: the gates of all steps in two matmuls (h_{t-1} is the layer's output), the
    cell states by their elementwise recurrence, and dz by the LSTM's backward recurrence written
    out (per step: one (n, 4H) x (4H, H) matmul and a few elementwise products). Layers below the
    top are rerun by the fused kernel for their outputs."""
    if m.training and m.dropout > 0 and m.num_layers > 1:
        raise RuntimeError(
            "grad_norms: an nn.LSTM with dropout between its layers in train mode: its dropout "
            "masks cannot be recovered; score it in eval mode"
        )
    x, hx = args[0], (args[1] if len(args) > 1 else kwargs.get("hx"))
    d_out, d_h, d_c = grads
    x, d_out = x.to(dtype), d_out.to(dtype)
    if not m.batch_first:
        x, d_out = x.transpose(0, 1), d_out.transpose(0, 1)
    n, hidden, layers = x.shape[0], m.hidden_size, m.num_layers
    zeros = x.new_zeros(layers, n, hidden)
    h0, c0 = (zeros, zeros) if hx is None else (v.to(dtype) for v in hx)
    d_h = zeros if d_h is None else d_h.to(dtype)
    d_c = zeros if d_c is None else d_c.to(dtype)
    weights = [
        [getattr(m, f"{w}_l{k}", None) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        for k in range(layers)
    ]
    weights = [[None if w is None else w.detach().to(dtype) for w in ws] for ws in weights]
    names_l0 = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    seqs = [x]  # each layer's input sequence (n, T, in_k), by the fused kernel, and the output
    for k in range(layers - 1):
        cell = nn.LSTM(seqs[-1].shape[-1], hidden, 1, m.bias, batch_first=True, device="meta")
        params = {a: w for a, w in zip(names_l0, weights[k], strict=True) if w is not None}
        state = (h0[k : k + 1].contiguous(), c0[k : k + 1].contiguous())
        seqs.append(functional_call(cell, params, (seqs[-1], state))[0])
    seqs.append(output.to(dtype) if m.batch_first else output.to(dtype).transpose(0, 1))
    per_sample: PerSample = {}
    for k in reversed(range(layers)):
        w_ih, w_hh, b_ih, b_hh = weights[k]
        h_prev = torch.cat([h0[k].unsqueeze(1), seqs[k + 1][:, :-1]], 1)  # (n, T, H)
        dz = _lstm_gate_gradients(seqs[k], h_prev, c0[k], weights[k], d_out, d_h[k], d_c[k])
        grads_k = {
            f"weight_ih_l{k}": Factors(seqs[k].unsqueeze(1), dz.unsqueeze(1), w_ih.shape),
            f"weight_hh_l{k}": Factors(h_prev.unsqueeze(1), dz.unsqueeze(1), w_hh.shape),
            f"bias_ih_l{k}": dz.sum(1),
            f"bias_hh_l{k}": dz.sum(1),
        }
        per_sample.update({key: v for key, v in grads_k.items() if key in names})
        if k:
            d_out = dz @ w_ih  # the gradient of the layer below's output sequence
    return per_sample


def _lstm_gate_gradients(x, h_prev, c0, weights, d_out, d_hn, d_cn) -> Tensor:
    """dz (n, T, 4H) of one LSTM layer (gates i, f, g, o; batch first) from its input x (n, T, in),
    its previous hidden states h_prev (n, T, H), its first cell state c0 (n, H), the gradients of
    its output sequence d_out (n, T, H) and of its final states d_hn, d_cn (n, H)."""
    w_ih, w_hh, b_ih, b_hh = weights
    n, t, hidden = *x.shape[:2], w_hh.shape[1]
    # every step's gates at once: (n T, in) x (in, 4H) + (n T, H) x (H, 4H)
    z = torch.addmm(x.reshape(n * t, -1) @ w_ih.T, h_prev.reshape(n * t, -1), w_hh.T)
    if b_ih is not None:
        z += b_ih + b_hh
    gates = torch.sigmoid(z).view(n, t, 4 * hidden)
    gates[..., 2 * hidden : 3 * hidden] = torch.tanh(
        z.view(n, t, 4 * hidden)[..., 2 * hidden : 3 * hidden]
    )
    i, f, g, o = gates.chunk(4, 2)
    update, c, cells = i * g, c0, []
    for step in range(t):  # c_t = f_t c_{t-1} + i_t g_t
        c = torch.addcmul(update[:, step], f[:, step], c)
        cells.append(c)
    cell = torch.stack(cells, 1)
    c_prev = torch.cat([c0.unsqueeze(1), cell[:, :-1]], 1)
    tanh_c = torch.tanh(cell)
    # dz_t = [dc coef_i, dc coef_f, dc coef_g, dh coef_o], and dc_t gets dh_t o_t (1 - tanh(c_t)^2)
    coef = torch.cat(
        [g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], 2
    )
    dc_from_dh = o * (1 - tanh_c * tanh_c)
    dh, dc, dzs = d_hn + d_out[:, t - 1], d_cn, [None] * t
    for step in reversed(range(t)):
        dc = torch.addcmul(dc, dh, dc_from_dh[:, step])
        dzs[step] = dz = torch.cat([dc, dc, dc, dh], 1) * coef[:, step]
        if step:
            dh = torch.addmm(d_out[:, step - 1], dz, w_hh)  # through h_{t-1}, plus the output's
            dc = dc * f[:, step]  # through c_{t-1}
    return torch.stack(dzs, 1)


def _lstm_supported(m: nn.Module) -> bool:
    return type(m) is nn.LSTM and not m.bidirectional and m.proj_size == 0


CLOSED_FORMS: dict[type, Callable] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.Embedding: _embedding,
    nn.LSTM: _lstm,
}


def closed_form(m: nn.Module) -> Callable | None:
    """The closed form for module ``m``, or None (torch.func fallback)."""
    if isinstance(m, nn.Embedding) and (m.scale_grad_by_freq or m.sparse):
        return None  # scale_grad_by_freq rescales by counts over the whole batch
    if isinstance(m, nn.LSTM):
        return _lstm if _lstm_supported(m) else None
    return CLOSED_FORMS.get(type(m))


# ------------------------------------------------------------------ the fallback: torch.func
def _vmap_fallback(m: nn.Module, args, kwargs, grads, names, dtype) -> PerSample:
    """Per sample i: the gradient of <m(inputs_i), delta_i> with respect to m's own trainable
    parameters, by vmap of grad over a functional call of m alone (RNNs: a loop over samples).
    Tensors whose first dim is the batch are split; other inputs are shared. (RNNs with
    batch_first=False: dim 1.)"""
    batch_dim = 1 if isinstance(m, nn.RNNBase) and not m.batch_first else 0
    flat_args, spec = tree_flatten((args, kwargs))
    n = next(a.shape[batch_dim] for a in flat_args if isinstance(a, Tensor) and a.dim() > 0)

    def split(v):
        if isinstance(v, Tensor) and v.dim() > batch_dim and v.shape[batch_dim] == n:
            return batch_dim
        return None

    dims = [split(a) for a in flat_args]
    flat_args = [
        a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in flat_args
    ]
    params = {k: p.detach().to(dtype) for k, p in m.named_parameters(recurse=False) if k in names}
    grad_dims = [None if g is None else split(g) for g in grads]
    grads = [None if g is None else g.to(dtype) for g in grads]

    def inner(p, flat, ds):
        # each split tensor arrives without its batch dim: put back a batch of one
        flat = [
            a if dim is None else a.unsqueeze(batch_dim) for a, dim in zip(flat, dims, strict=True)
        ]
        a, kw = spec.unflatten(flat)
        outs, _ = tree_flatten(functional_call(m, p, tuple(a), kw, strict=False))
        total = 0.0
        for o, dl, dim in zip(outs, ds, grad_dims, strict=True):
            if dl is not None:
                total = total + (o * (dl if dim is None else dl.unsqueeze(batch_dim))).sum()
        return total

    if isinstance(m, nn.RNNBase):
        # vmap has no batching rule for the fused RNN kernels (it would loop over the samples
        # anyway, and fails on time-first inputs): loop over the samples here
        def pick(values, value_dims, i):
            return [
                v if k is None else v.select(k, i) for v, k in zip(values, value_dims, strict=True)
            ]

        rows = [
            grad(inner)(params, pick(flat_args, dims, i), pick(grads, grad_dims, i))
            for i in range(n)
        ]
        return {k: torch.stack([r[k] for r in rows]) for k in params}
    per_sample = vmap(grad(inner), in_dims=(None, dims, grad_dims))(params, flat_args, grads)
    return dict(per_sample)


# ------------------------------------------------------------------ the recorder
@dataclass
class _Call:
    """One forward call of a recorded module: its inputs and, filled by the backward, the
    gradients of its (flattened) outputs."""

    layer: _Layer
    args: tuple
    kwargs: dict
    versions: list
    outputs: list  # (shape, dtype, device) of each output leaf, None for a non-tensor leaf
    grads: list
    pending: int
    roots: list | None  # [(output, its version)] when no input has a graph (see grad_targets)
    kept: Tensor | None = None  # the output sequence, for nn.LSTM


@dataclass
class _Layer:
    name: str
    module: nn.Module
    names: list[str]  # its trainable parameters (of its own)
    params: list[nn.Parameter]
    form: Callable | None
    calls: list[_Call] = field(default_factory=list)


class GradNormRecorder:
    """Per-sample squared gradient norms from the caller's own backward pass (entry point b).

    Usage (one forward, one backward per ``with``)::

        recorder = GradNormRecorder(model)
        with recorder:
            losses = loss_fn(model(x), y)          # (n,)
        (w * losses).mean().backward()             # the ordinary step
        sq = recorder.squared_norms()              # (n,): (w_i / n)^2 ||grad L_i||^2

    Module hooks exist only inside the ``with`` block (nothing is left registered, so a model
    outside it runs at full speed); the tensor hooks they put on the outputs live and die with
    that forward's graph. Use the module the forward actually runs: for a ``torch.compile``'d
    model, run the step's forward through ``model._orig_mod`` (the compiled graph does not
    hand out per-layer activations). The norms are in the parameters' dtype; under autocast the
    layers' bf16 activations and gradients are cast up before the norms are taken.
    """

    def __init__(self, model: nn.Module):
        self.model = getattr(model, "_orig_mod", model)
        self.layers: list[_Layer] = []
        for name, m in self.model.named_modules():
            own = [(k, p) for k, p in m.named_parameters(recurse=False) if p.requires_grad]
            if own:
                form = closed_form(m)
                names, params = [k for k, _ in own], [p for _, p in own]
                self.layers.append(_Layer(name, m, names, params, form))
        unknown = sorted({type(layer.module).__name__ for layer in self.layers if not layer.form})
        if unknown:
            warnings.warn(
                f"grad_norms: no closed form for {', '.join(unknown)}: their per-sample gradients "
                "are computed with torch.func (vmap, exact but slower)",
                stacklevel=2,
            )
        self._handles: list = []
        self._total: Tensor | None = None
        self._open = False
        self._busy = False  # inside a fallback's functional call: do not record
        self._uses: dict[int, int] | None = None  # id(param) -> calls using it

    # -------------------------------------------------------------- forward side
    def __enter__(self) -> GradNormRecorder:
        self.reset()
        for layer in self.layers:
            hook = self._forward_hook(layer)
            self._handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget what was recorded (the next forward starts a new measurement)."""
        for layer in self.layers:
            layer.calls = []
        self._total, self._open, self._uses = None, True, None

    def _forward_hook(self, layer: _Layer):
        def hook(module, args, kwargs, output):
            if self._busy or not torch.is_grad_enabled():
                return
            leaves, _ = tree_flatten(output)
            tracked = [o if isinstance(o, Tensor) and o.requires_grad else None for o in leaves]
            if not any(o is not None for o in tracked):
                return
            flat, _ = tree_flatten((args, kwargs))
            call = _Call(
                layer=layer,
                args=tuple(a.detach() if isinstance(a, Tensor) else a for a in args),
                kwargs={k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()},
                versions=[a._version for a in flat if isinstance(a, Tensor)],
                outputs=[None if o is None else (o.shape, o.dtype, o.device) for o in tracked],
                grads=[None] * len(tracked),
                pending=sum(o is not None for o in tracked),
                roots=None,
            )
            if layer.form is _lstm:  # its closed form reuses the output sequence
                call.kept = leaves[0].detach()
            if not any(isinstance(a, Tensor) and a.grad_fn is not None for a in flat):
                call.roots = [(o, o._version) for o in tracked if o is not None]
            layer.calls.append(call)
            for k, o in enumerate(tracked):
                if o is not None:
                    o.register_hook(self._backward_hook(call, k))

        return hook

    # -------------------------------------------------------------- backward side
    def _backward_hook(self, call: _Call, k: int):
        def hook(g: Tensor) -> None:
            if not self._open or call.grads[k] is not None:
                return
            call.grads[k] = g.detach()
            call.pending -= 1
            call.roots = None  # the backward is under way: no need to keep the outputs
            # A single-output, single-use layer is done now: reduce it and free its tensors.
            if call.pending == 0 and len(call.grads) == 1 and call.layer.form is not None:
                if self._single_use(call.layer):
                    with torch.no_grad():
                        self._add(self._compute(call))
                    call.layer.calls.remove(call)

        return hook

    def _single_use(self, layer: _Layer) -> bool:
        """Whether each of the layer's parameters is used by exactly this one call."""
        if self._uses is None:
            self._uses = {}
            for other in self.layers:
                for p in other.params:
                    self._uses[id(p)] = self._uses.get(id(p), 0) + len(other.calls)
        return all(self._uses[id(p)] == 1 for p in layer.params)

    def _compute(self, call: _Call) -> PerSample:
        layer = call.layer
        versions = [
            a._version for a in tree_flatten((call.args, call.kwargs))[0] if isinstance(a, Tensor)
        ]
        if versions != call.versions:
            raise RuntimeError(
                f"grad_norms: an input of {layer.name or 'the model'} "
                f"({type(layer.module).__name__}) was modified in place after its forward"
            )
        grads = [
            g if g is not None or o is None else torch.zeros(o[0], dtype=o[1], device=o[2])
            for g, o in zip(call.grads, call.outputs, strict=True)
        ]
        dtype, device = layer.params[0].dtype, layer.params[0].device
        form = layer.form or _vmap_fallback
        self._busy = True
        try:  # exact norms of what the step computed: no autocast here (a CPU backward may run
            # inside the caller's autocast block)
            with torch.autocast(device.type, enabled=False):
                extra = (call.kept,) if form is _lstm else ()
                return form(layer.module, call.args, call.kwargs, grads, layer.names, dtype, *extra)
        finally:
            self._busy = False

    def _add(self, per_sample: PerSample) -> None:
        for g in per_sample.values():
            self._accumulate(_sq_norm(g))

    def _accumulate(self, sq: Tensor) -> None:
        if self._total is None:
            self._total = sq
        elif len(sq) != len(self._total):
            raise RuntimeError(
                f"grad_norms: layers saw batches of {len(self._total)} and {len(sq)} samples: "
                "every layer must have the batch on dim 0 (nn.LSTM: as its batch_first says)"
            )
        else:
            self._total = self._total + sq

    def squared_norms(self) -> Tensor:
        """(n,) squared norms of each sample's contribution to the recorded backward, over all
        trainable parameters. Call once, after the backward; later backward passes through the
        same graph are ignored."""
        with torch.no_grad():
            shared: dict[int, Tensor] = {}  # id(param) -> summed per-sample gradients
            for layer in self.layers:
                calls = [
                    c for c in layer.calls if c.pending < sum(o is not None for o in c.outputs)
                ]
                if not calls:
                    continue
                if self._single_use(layer) and len(calls) == 1:
                    self._add(self._compute(calls[0]))
                    continue
                for call in calls:  # exact for shared weights: sum the uses, then the norm
                    for name, g in self._compute(call).items():
                        p = layer.params[layer.names.index(name)]
                        g = _materialise(g)
                        shared[id(p)] = shared[id(p)] + g if id(p) in shared else g
            for g in shared.values():
                self._accumulate(g.pow(2).flatten(1).sum(1))
            for layer in self.layers:
                layer.calls = []
        self._open = False
        if self._total is None:
            raise RuntimeError(
                "grad_norms: nothing was recorded: run the forward inside the recorder and a "
                "backward through its outputs before squared_norms() (a torch.compile'd model "
                "ignores the hooks: run its forward as model._orig_mod inside the recorder)"
            )
        return self._total

    def grad_targets(self) -> list[Tensor]:
        """Few tensors whose gradients make a backward pass reach every recorded layer while
        computing no parameter gradient: the outputs of the *root* calls (no input with a graph
        behind it, e.g. the first layer). Every other recorded call lies on a path from a root's
        output to the loss, so its hook fires. A root output modified in place after the forward
        (its current value is no longer the layer's output) gives the layer's parameters."""
        targets = []
        for layer in self.layers:
            for call in layer.calls:
                if call.roots is None:
                    continue
                if all(o._version == v for o, v in call.roots):
                    targets += [o for o, _ in call.roots]
                else:
                    targets += layer.params
        return list({id(t): t for t in targets}.values())


# ------------------------------------------------------------------ entry point (a): scores
def gradient_norm_scores(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = cross_entropy,
    chunk_size: int = 256,
) -> Tensor:
    """Exact ||grad_theta L_i||_2 over all trainable parameters, shape (n,), from one forward and
    one backward per chunk of ``chunk_size`` samples (memory: one chunk's activations and their
    gradients). No parameter's .grad is touched; the backward computes no parameter gradient
    except for layers that see the raw input. Computed in the model's dtype with autocast off
    (this is the exact oracle); a ``torch.compile``'d model is scored through its original
    module. Call it with the model in eval mode if it has BatchNorm (see the module docstring)."""
    model = getattr(model, "_orig_mod", model)
    recorder = GradNormRecorder(model)
    if not recorder.layers:
        return torch.zeros(len(inputs), device=inputs.device)
    dtype = recorder.layers[0].params[0].dtype
    norms = []
    no_autocast = torch.autocast(inputs.device.type, enabled=False)
    with torch.enable_grad(), torch.inference_mode(False), no_autocast:
        for start in range(0, len(inputs), chunk_size):
            x, y = inputs[start : start + chunk_size], targets[start : start + chunk_size]
            x = x.detach().to(dtype) if x.is_floating_point() else x
            x = x.clone() if x.is_inference() else x
            y = y.clone() if y.is_inference() else y
            with recorder:
                loss = loss_fn(model(x), y).sum()
            torch.autograd.grad(loss, recorder.grad_targets(), allow_unused=True)
            norms.append(recorder.squared_norms())
    return torch.cat(norms).sqrt()


# ------------------------------------------------------------------ the reference: torch.func
def _per_sample_gradient_chunks(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, chunk_size: int
) -> Iterator[dict[str, Tensor]]:
    """Yield per-sample gradients, {param name: (chunk, *param.shape)}, chunk by chunk."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: use the original
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    dtype = next((v.dtype for v in params.values()), torch.float32)
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
            x = x.to(dtype) if x.is_floating_point() else x
            yield per_sample_grads(params, x, targets[start:end])


def gradient_norm_scores_vmap(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = cross_entropy,
    chunk_size: int = 256,
) -> Tensor:
    """The same norms as ``gradient_norm_scores`` by torch.func (vmap of grad over a functional
    call), in chunks of ``chunk_size`` samples: memory is chunk_size copies of the gradient, time
    is often many backward passes. Kept as an independent reference and for the benchmark."""
    chunks = _per_sample_gradient_chunks(model, inputs, targets, loss_fn, chunk_size)
    return torch.cat([sum(t.pow(2).flatten(1).sum(1) for t in g.values()).sqrt() for g in chunks])


def per_sample_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = cross_entropy,
    chunk_size: int = 256,
) -> Tensor:
    """Flattened per-sample gradients over all trainable parameters, shape (n, num_params)."""
    chunks = _per_sample_gradient_chunks(model, inputs, targets, loss_fn, chunk_size)
    return torch.cat([torch.cat([t.flatten(1) for t in g.values()], 1) for g in chunks])


__all__ = [
    "Factors",
    "GradNormRecorder",
    "RowSums",
    "closed_form",
    "gradient_norm_scores",
    "gradient_norm_scores_vmap",
    "per_sample_gradients",
]

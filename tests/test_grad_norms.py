"""Exact per-sample gradient norms from one backward (grad_norms.py), checked in float64 against a
loop of ordinary backward passes, one sample at a time."""

import warnings

import pytest
import torch
from torch import nn

from importance_sampling.core.grad_norms import (
    ConvFactors,
    Factors,
    GradNormRecorder,
    _conv,
    _sq_norm,
    gradient_norm_scores,
    gradient_norm_scores_vmap,
)
from importance_sampling.core.scores import cross_entropy
from importance_sampling.engine.models import (
    CNN,
    MLP,
    LSTMClassifier,
    TorchvisionResNet,
    WideResNet,
)

EXACT = dict(rtol=1e-10, atol=1e-12)  # float64: exact up to rounding


def loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, P): sample i alone through the model, loss.backward(), the trainable params' .grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        cross_entropy(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        rows.append(torch.cat([g.flatten() for g in grads]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def check(model: nn.Module, x: torch.Tensor, classes: int, chunk_size: int = 3) -> torch.Tensor:
    """Entry point (a) equals the loop, in float64, and never touches .grad."""
    torch.manual_seed(1)
    y = torch.randint(0, classes, (len(x),))
    expected = loop_grads(model, x, y).norm(dim=1)
    norms = gradient_norm_scores(model, x, y, cross_entropy, chunk_size)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, expected, **EXACT)
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())  # nothing left registered
    return norms


# ------------------------------------------------------------------ layer by layer
class Head(nn.Module):
    """body, then flatten and a Linear head to 3 classes (so every body gets a real loss)."""

    def __init__(self, body: nn.Module, features: int):
        super().__init__()
        self.body, self.head = body, nn.Linear(features, 3)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


class TokenMean(nn.Module):
    """Linear on (n, T, d) (the weight shared over T), LayerNorm, mean over T."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(5, 6), nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(self.lin(x)).mean(1)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)

    def forward(self, idx):
        return self.emb(idx).sum(1)


class SequenceModel(nn.Module):
    """Two-layer LSTM with the time axis first, using both its outputs and its final state."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, batch_first=False)

    def forward(self, x):
        out, (h, c) = self.lstm(x.transpose(0, 1))
        return torch.cat([out.mean(0), h[0], c[1]], 1)


def running_stats(bn: nn.Module) -> nn.Module:
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    return bn.eval()


LAYERS = {
    "linear": lambda: (Head(nn.Linear(6, 5), 5), torch.randn(7, 6)),
    "linear_over_tokens_gram": lambda: (Head(nn.Linear(8, 8), 2 * 8), torch.randn(7, 2, 8)),
    "linear_shared_over_tokens_layer_norm": lambda: (Head(TokenMean(), 6), torch.randn(7, 4, 5)),
    "conv_stride_padding": lambda: (
        Head(nn.Conv2d(2, 3, 3, stride=2, padding=1), 3 * 4 * 4),
        torch.randn(7, 2, 8, 8),
    ),
    "conv_groups_dilation": lambda: (
        Head(nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), 6 * 6 * 6),
        torch.randn(7, 4, 6, 6),
    ),
    "conv_same_reflect": lambda: (
        Head(nn.Conv2d(2, 3, (3, 2), padding="same", padding_mode="reflect"), 3 * 5 * 5),
        torch.randn(7, 2, 5, 5),
    ),
    "conv1d": lambda: (Head(nn.Conv1d(2, 3, 3, stride=2), 3 * 4), torch.randn(7, 2, 9)),
    "batch_norm_2d_eval": lambda: (
        Head(nn.Sequential(nn.Conv2d(2, 3, 3), running_stats(nn.BatchNorm2d(3))), 3 * 3 * 3),
        torch.randn(7, 2, 5, 5),
    ),
    "batch_norm_1d_eval": lambda: (
        Head(nn.Sequential(nn.Linear(4, 5), running_stats(nn.BatchNorm1d(5))), 5),
        torch.randn(7, 4),
    ),
    "group_norm": lambda: (
        Head(nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4)), 4 * 3 * 3),
        torch.randn(7, 2, 5, 5),
    ),
    "embedding_repeated_tokens": lambda: (
        Head(Tokens(), 4),
        torch.tensor([[1, 1, 2, 0], [3, 3, 3, 3], [0, 0, 4, 1], [6, 5, 6, 2], [2, 0, 2, 0]]),
    ),
    "lstm_two_layers_time_first": lambda: (Head(SequenceModel(), 12), torch.randn(7, 5, 3)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_each_layer_type_matches_a_per_sample_backward_loop(name):
    torch.manual_seed(0)
    model, x = LAYERS[name]()
    model = model.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a closed form for each: no fallback warning
        check(model, x.double() if x.is_floating_point() else x, 3)


@pytest.mark.parametrize(
    "channels, size, stride, form, groups",
    [
        ((16, 16), 3, 1, Factors, 1),  # few positions, wide kernel: the Gram form
        ((3, 4), 9, 1, torch.Tensor, 1),  # narrow layer: the grouped weight-gradient kernel
        ((72, 72), 19, 2, ConvFactors, 1),  # wide, many positions: shifted views (stride 2)
        ((130, 130), 9, 1, ConvFactors, 2),  # the same with stride 1 and two groups
    ],
)
def test_each_conv_form_is_exact(channels, size, stride, form, groups):
    torch.manual_seed(0)
    dilation = 2 if stride == 2 else 1
    conv = nn.Conv2d(*channels, 3, stride, padding=1, dilation=dilation, groups=groups).double()
    x = torch.randn(3, channels[0], size, size, dtype=torch.float64)
    out = conv(x)
    d = torch.randn_like(out)
    per_sample = _conv(conv, (x,), {}, [d], ["weight", "bias"], torch.float64)
    assert isinstance(per_sample["weight"], form)
    expected = []
    for i in range(3):  # <conv(x_i), d_i> differentiated by autograd, one sample at a time
        gw, gb = torch.autograd.grad((conv(x[i : i + 1]) * d[i : i + 1]).sum(), conv.parameters())
        expected.append(gw.pow(2).sum() + gb.pow(2).sum())
    weight = per_sample["weight"]
    got = _sq_norm(weight)
    torch.testing.assert_close(got + per_sample["bias"].pow(2).sum(1), torch.stack(expected))
    if not isinstance(weight, torch.Tensor):  # the materialised form of the same gradients
        assert weight.materialise().shape == (3, *conv.weight.shape)
        torch.testing.assert_close(weight.materialise().flatten(1).pow(2).sum(1), got)


class Twice(nn.Module):
    """One Linear applied twice in one forward, and a second Linear tied to the first's weight."""

    def __init__(self):
        super().__init__()
        self.shared, self.tied = nn.Linear(4, 4), nn.Linear(4, 4)
        self.tied.weight = self.shared.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.tied(torch.tanh(self.shared(torch.tanh(self.shared(x))))))


def test_a_module_called_twice_and_a_tied_weight_stay_exact():
    torch.manual_seed(0)
    check(Twice().double(), torch.randn(7, 4, dtype=torch.float64), 3)


class Scale(nn.Module):
    """A parametrised module without a closed form."""

    def __init__(self, features: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return x * self.scale + self.scale.pow(2)


def test_an_unknown_module_falls_back_to_torch_func_with_one_warning():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), Scale(5))
    model = Head(body, 5).double()
    with pytest.warns(UserWarning, match="no closed form for Scale") as record:
        check(model, torch.randn(7, 4, dtype=torch.float64), 3)
    assert len([w for w in record if "closed form" in str(w.message)]) == 1


def test_frozen_parameters_are_excluded():
    torch.manual_seed(0)
    model = CNN((1, 6, 6), 3, channels=(2,), hidden_size=4).double()
    model.features[0].weight.requires_grad_(False)  # the conv's bias stays trainable
    model.classifier[1].requires_grad_(False)
    check(model, torch.randn(5, 1, 6, 6, dtype=torch.float64), 3)


# ------------------------------------------------------------------ every model of the repository
MODELS = {
    "mlp": lambda: (MLP((1, 6, 6), 4, hidden_sizes=(8, 5)), torch.randn(7, 1, 6, 6)),
    "cnn": lambda: (CNN((1, 8, 8), 4, channels=(3, 4), hidden_size=6), torch.randn(7, 1, 8, 8)),
    "wrn": lambda: (WideResNet((3, 8, 8), 4, depth=10, widen_factor=1), torch.randn(5, 3, 8, 8)),
    "resnet": lambda: (
        TorchvisionResNet((3, 32, 32), 4, arch="resnet18", weights=None),
        torch.randn(3, 3, 32, 32),
    ),
    "lstm": lambda: (LSTMClassifier((6, 2), 4, hidden_size=5), torch.randn(7, 6, 2)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_matches_a_per_sample_backward_loop(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model = model.double()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            running_stats(m)
    model.eval()
    check(model, x.double(), 4)
    if name in ("mlp", "cnn", "lstm"):  # no BatchNorm, no dropout: train mode is the same
        check(model.train(), x.double(), 4)


def test_batch_norm_in_train_mode_gives_each_samples_share_of_the_batch_gradient():
    """In train mode BatchNorm mixes the samples: the recorder returns the norm of the part of the
    batch gradient that flows through sample i's own activations. Checked against per-sample
    copies of every parameter (sample i uses copy i; the batch statistics stay shared)."""
    torch.manual_seed(0)
    n = 6
    lin1, bn, lin2 = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)
    model = nn.Sequential(lin1, bn, nn.ReLU(), lin2).double().train()
    x, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    copies = [p.detach().expand(n, *p.shape).clone().requires_grad_() for p in model.parameters()]
    w1, b1, gamma, beta, w2, b2 = copies
    h = torch.einsum("nhd,nd->nh", w1, x) + b1
    h_hat = (h - h.mean(0)) / torch.sqrt(h.var(0, correction=0) + bn.eps)
    out = torch.einsum("nch,nh->nc", w2, torch.relu(gamma * h_hat + beta)) + b2
    grads = torch.autograd.grad(cross_entropy(out, y).sum(), copies)
    expected = sum(g.flatten(1).pow(2).sum(1) for g in grads)
    recorder = GradNormRecorder(model)
    with recorder:
        loss = cross_entropy(model(x), y).sum()
    loss.backward()
    torch.testing.assert_close(recorder.squared_norms(), expected, **EXACT)


# ------------------------------------------------------------------ entry point (b): a training step
def test_recorder_gives_each_samples_share_of_a_weighted_mean_loss():
    torch.manual_seed(0)
    model = WideResNet((3, 8, 8), 4, depth=10, widen_factor=1).double().eval()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (5,))
    w = torch.rand(5, dtype=torch.float64) + 0.5
    recorder = GradNormRecorder(model)
    with recorder:
        losses = cross_entropy(model(x), y)
    assert all(not m._forward_hooks for m in model.modules())  # hooks gone after the block
    (w * losses).mean().backward()  # the caller's step: .grad is filled as usual
    assert all(p.grad is not None for p in model.parameters())
    sq = recorder.squared_norms()
    expected = loop_grads(model, x, y).pow(2).sum(1)
    torch.testing.assert_close(sq / (w / 5) ** 2, expected, **EXACT)
    # a second backward through the same graph is not counted twice
    torch.testing.assert_close(recorder.squared_norms(), sq)


def test_recorder_keeps_float32_norms_under_bf16_autocast():
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, hidden_sizes=(8,))
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    recorder = GradNormRecorder(model)
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy(model(x), y).sum()
    loss.backward()
    sq = recorder.squared_norms()
    assert sq.dtype == torch.float32
    # bf16 activations: close to the float32 norms, not equal
    expected = gradient_norm_scores(model, x, y, cross_entropy).pow(2)
    torch.testing.assert_close(sq, expected, rtol=0.05, atol=1e-4)


def test_scores_match_the_vmap_path_in_float32_and_stay_float32_under_autocast():
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 4, channels=(3, 4), hidden_size=6).eval()
    x, y = torch.randn(9, 1, 8, 8), torch.randint(0, 4, (9,))
    expected = gradient_norm_scores_vmap(model, x, y, cross_entropy, chunk_size=4)
    torch.testing.assert_close(gradient_norm_scores(model, x, y, cross_entropy, 4), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norms = gradient_norm_scores(model, x, y, cross_entropy, 4)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, expected)


@pytest.mark.slow
def test_a_compiled_model_is_scored_through_its_original_module():
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 4, channels=(3,), hidden_size=6).double()
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (5,))
    compiled = torch.compile(model)
    compiled(x).sum().backward()  # compiled and run once, as in training
    model.zero_grad(set_to_none=True)
    expected = loop_grads(model, x, y).norm(dim=1)
    torch.testing.assert_close(gradient_norm_scores(compiled, x, y, cross_entropy), expected)
    recorder = GradNormRecorder(compiled)  # the compiled graph ignores hooks: a clear error
    with recorder:
        loss = cross_entropy(compiled(x), y).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="_orig_mod"):
        recorder.squared_norms()
    with recorder:  # through the original module: exact
        loss = cross_entropy(compiled._orig_mod(x), y).sum()
    loss.backward()
    torch.testing.assert_close(recorder.squared_norms().sqrt(), expected, **EXACT)


def test_an_lstm_with_dropout_in_train_mode_is_refused_in_one_line():
    model = Head(SequenceModel(), 12)
    model.body.lstm.dropout = 0.5
    x, y = torch.randn(4, 5, 3), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match="score it in eval mode"):
        gradient_norm_scores(model.train(), x, y, cross_entropy)
    assert gradient_norm_scores(model.eval(), x, y, cross_entropy).shape == (4,)


class Bidirectional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, bidirectional=True)  # time first

    def forward(self, x):
        return self.lstm(x.transpose(0, 1))[0].mean(0)


def test_a_bidirectional_lstm_falls_back_to_torch_func_along_its_batch_dim():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no closed form for LSTM"):
        check(Head(Bidirectional(), 8).double(), torch.randn(5, 4, 3, dtype=torch.float64), 3)


# ------------------------------------------------------------------ in the training step
def test_uniform_steps_of_the_gradient_norm_sampler_take_tau_from_their_own_backward(
    tmp_path, monkeypatch
):
    """tau of a uniform step = tau of the exact per-sample gradient norms of its batch, recorded
    in the step's backward: no scoring pass (which would fail here)."""
    import copy

    from importance_sampling.core import samplers
    from importance_sampling.core.grad_norms import gradient_norm_scores
    from importance_sampling.core.sampling import score_sums, tau_from_sums
    from importance_sampling.core.scores import cross_entropy
    from importance_sampling.engine.budget import Budget
    from importance_sampling.engine.data import digits
    from importance_sampling.engine.models import MLP
    from importance_sampling.engine.runtime import Runtime
    from importance_sampling.engine.trainer import Trainer

    data = digits()
    torch.manual_seed(0)
    model = MLP(data.input_shape, data.num_classes)
    sampler = samplers.ImportanceSampler(
        "gradient_norm", batch_size=32, tau_threshold=1e9, tau_momentum=0.0
    )
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        sampler,
        data,
        tmp_path,
        budget=Budget(None, max_steps=1, eval_every_seconds=None, eval_every_steps=1),
        runtime=Runtime("cpu"),
        progress=False,
    )
    before = copy.deepcopy(model)
    batch = copy.deepcopy(sampler.order).take(32)
    monkeypatch.setattr(samplers, "gradient_norm_scores", None)  # an extra pass would fail
    trainer.train_step()
    exact = gradient_norm_scores(before, data.train_x[batch], data.train_y[batch], cross_entropy)
    assert sampler.tau == pytest.approx(
        tau_from_sums(score_sums(exact), len(exact)).item(), rel=1e-5
    )

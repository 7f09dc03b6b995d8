"""A training step never waits for the device, except to read the switch's decision.

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` makes any synchronising call fail. On the
CPU nothing synchronises, so the same property is checked where it is decided: no tensor is read
on the host (``item``, ``bool``, ``float``, ``int``, ``tolist``) during the steps, except by
``VarianceReductionSwitch.on``, the one allowed read per step. (On the CPU the samplers keep tau
a float, ``tau_on_host``: reading it costs nothing there; the test runs the device's path.)
"""

import inspect

import pytest
import torch

from importance_sampling.core.baselines import HistorySampler
from importance_sampling.core.samplers import ImportanceSampler, UniformSampler
from importance_sampling.engine.budget import Budget
from importance_sampling.engine.data import digits
from importance_sampling.engine.models import MLP
from importance_sampling.engine.runtime import Runtime
from importance_sampling.engine.trainer import Trainer

READS = ("item", "__bool__", "__float__", "__int__", "tolist")


def trainer_for(sampler, device, tmp_path):
    data = digits()
    torch.manual_seed(0)
    model = MLP(data.input_shape, data.num_classes)
    return Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        sampler,
        data,
        tmp_path,
        budget=Budget(None, max_steps=1000, eval_every_seconds=None, eval_every_steps=1000),
        runtime=Runtime(device, check_finite="row"),
        progress=False,
    )


SAMPLERS = {
    "uniform": lambda: UniformSampler(32),
    "upper_bound": lambda: ImportanceSampler(
        "upper_bound", 32, tau_threshold=1.0, tau_momentum=0.0
    ),
    "loss": lambda: ImportanceSampler("loss", 32, tau_threshold=1.0, tau_momentum=0.0),
    "gradient_norm": lambda: ImportanceSampler(
        "gradient_norm", 32, tau_threshold=1.0, tau_momentum=0.0
    ),
    "history": lambda: HistorySampler(
        "upper_bound", batch_size=32, tau_threshold=1.0, tau_momentum=0.0
    ),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_steps_read_nothing_on_the_host_but_the_switch(name, tmp_path, monkeypatch):
    trainer = trainer_for(SAMPLERS[name](), "cpu", tmp_path)
    trainer.sampler.tau_on_host = False  # the GPU's path (on the CPU tau is a float: no cost)
    for _ in range(5):  # the switch turns importance sampling on
        trainer.train_step()
    reads = []

    def counting(method):
        original = getattr(torch.Tensor, method)

        def read(self, *args, **kwargs):
            caller = inspect.stack()[1]
            reads.append(f"{caller.filename.rsplit('/', 1)[-1]}:{caller.function}")
            return original(self, *args, **kwargs)

        return read

    for method in READS:
        monkeypatch.setattr(torch.Tensor, method, counting(method))
    steps = 20
    for _ in range(steps):
        trainer.train_step()
    monkeypatch.undo()
    outside_switch = [r for r in reads if r not in ("sampling.py:on", "sampling.py:_to_float")]
    assert not outside_switch
    assert len(reads) <= steps  # at most one read per step: the decision
    if name != "uniform":
        assert trainer.importance_steps > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", SAMPLERS)
def test_cuda_steps_do_not_synchronise(name, tmp_path):
    trainer = trainer_for(SAMPLERS[name](), "cuda", tmp_path)
    for _ in range(5):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if name != "uniform":
        assert trainer.importance_steps > 10

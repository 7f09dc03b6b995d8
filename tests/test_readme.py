"""The README's library examples run as printed."""

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_own_loop_examples_run_and_train():
    own_loop, pieces = [b for b in python_blocks() if "importance_sampling" in b][:2]
    scope: dict = {}
    exec(own_loop, scope)
    data, model = scope["data"], scope["model"]
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(data.train_x), data.train_y).item()
    assert final < 0.3
    assert scope["sampler"].tau > 1  # the switch saw non-uniform scores

    scope["x_B"], scope["y_B"] = data.train_x[:96], data.train_y[:96]
    exec(pieces, scope)
    assert scope["weights"].shape == (32,) and scope["loss"].requires_grad

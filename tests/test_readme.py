"""The README's library examples run as printed, each on its own, and say what they did."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def run(block: str) -> tuple[dict, str]:
    scope: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block, scope)
    return scope, out.getvalue()


def test_own_loop_example_trains_and_prints_its_result():
    own_loop = [b for b in python_blocks() if "importance_sampling" in b][0]
    scope, printed = run(own_loop)
    model, x, y = scope["model"], scope["x"], scope["y"]
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(x), y).item()
    assert final < 0.1  # the rule is learnt
    assert scope["sampler"].tau > scope["sampler"].switch.threshold  # importance sampling on
    assert printed.startswith("training loss ") and f"{final:.4f}" in printed


UPPER_BOUND = 'ImportanceSampler(score="upper_bound", batch_size=64)'


@pytest.mark.parametrize(
    "sampler",
    [
        'ImportanceSampler(score="loss", batch_size=64)',
        'ImportanceSampler(score="gradient_norm", batch_size=64)',
        "OnlineBatchSampler(batch_size=64)",
        "HistorySampler(batch_size=64)",
        "InfoBatchSampler(batch_size=64)",
    ],
)
def test_own_loop_example_runs_as_written_for_every_score_and_later_method(sampler):
    own_loop = [b for b in python_blocks() if "importance_sampling" in b][0]
    assert UPPER_BOUND in own_loop
    baselines = (
        "from importance_sampling.core.baselines import "
        "HistorySampler, InfoBatchSampler, OnlineBatchSampler\n"
    )
    scope, printed = run(baselines + own_loop.replace(UPPER_BOUND, sampler))
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(scope["model"](scope["x"]), scope["y"]).item()
    assert final < 0.3 and printed.startswith("training loss ")


def test_the_gradient_norm_score_without_the_model_says_what_it_needs():
    from importance_sampling import ImportanceSampler, Presample, cross_entropy

    model = torch.nn.Linear(4, 3)
    sampler = ImportanceSampler(score="gradient_norm", batch_size=8)
    sampler.setup(64, seed=0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    chosen = sampler.select(model, Presample(x, y, torch.arange(8)), cross_entropy)
    logits = model(chosen.x)
    with pytest.raises(ValueError, match=r"needs the model after a uniform step: pass it"):
        sampler.update(chosen, logits.detach(), cross_entropy)


def test_the_pieces_alone_run_on_their_own_and_print():
    pieces = [b for b in python_blocks() if "importance_sampling" in b][1]
    scope, printed = run(pieces)
    assert scope["weights"].shape == (32,) and scope["model"].weight.grad is not None
    assert printed.startswith("trained on 32 of 96 points")


def test_infobatch_in_a_dataloader_loop_anneals_by_its_own_pass_count():
    """InfoBatch in a user's own DataLoader loop: it prunes and anneals with no trainer to set its
    progress (num_passes), and the loop reads its weights from select()."""
    from torch.utils.data import DataLoader, TensorDataset

    from importance_sampling import Presample, cross_entropy
    from importance_sampling.core.baselines import InfoBatchSampler
    from importance_sampling.engine.data import digits
    from importance_sampling.engine.models import MLP

    data = digits()
    train_set = TensorDataset(data.train_x, data.train_y, torch.arange(len(data.train_y)))
    torch.manual_seed(0)
    model = MLP(data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = InfoBatchSampler(batch_size=64, num_passes=4, anneal=0.75)
    sampler.setup(len(train_set), seed=0)
    loader = DataLoader(train_set, batch_sampler=sampler.batch_sampler(), num_workers=2)
    pruned_by_pass = {}
    for x, y, index in loader:
        if sampler.passes >= 4:
            break
        chosen = sampler.select(model, Presample(x, y, index), cross_entropy)
        pruned_by_pass[sampler.completed] = sampler.pruned
        logits = model(chosen.x)
        loss = chosen.weighted_mean(cross_entropy(logits, chosen.y))
        optimizer.zero_grad()
        loss.backward()
        sampler.update(chosen, logits.detach(), cross_entropy)
        optimizer.step()
    assert sorted(pruned_by_pass) == [0, 1, 2, 3]
    assert pruned_by_pass[0] == 0  # nothing seen yet
    assert pruned_by_pass[1] > 0 and pruned_by_pass[2] > 0  # below-mean samples pruned
    assert pruned_by_pass[3] == 0  # 3 of 4 passes done = anneal: the last pass uses every sample

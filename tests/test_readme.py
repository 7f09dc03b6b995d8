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


def test_infobatch_in_a_dataloader_loop_anneals_by_its_own_pass_count():
    """InfoBatch in a user's own DataLoader loop: it prunes and anneals with no trainer to set its
    progress (num_passes), and the loop reads its weights from select()."""
    from torch.utils.data import DataLoader, TensorDataset

    from importance_sampling import Presample, cross_entropy
    from importance_sampling.baselines import InfoBatchSampler
    from importance_sampling.data import digits
    from importance_sampling.models import MLP

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

"""The exact variance of the minibatch gradient estimator (variance.py): closed form on hand-checked
cases, against Monte Carlo, against brute force on a network, and the measurement in a run."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from importance_sampling.analysis.variance import ordering_holds
from importance_sampling.core.grad_norms import gradient_norm_scores, per_sample_gradients
from importance_sampling.core.sampling import importance_weights
from importance_sampling.core.variance import (
    DISTRIBUTIONS,
    VARIANCE_COLUMNS,
    estimator_error,
    gradient_statistics,
    measure,
    rank_correlation,
    trace_covariance,
)
from importance_sampling.engine.models import MLP, WideResNet

ROOT = Path(__file__).resolve().parents[1]


def stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||v_i||^2, ||mean_i v_i||^2) of per-sample gradients v (B, P)."""
    return v.double().pow(2).sum(1), v.double().mean(0).pow(2).sum()


# ------------------------------------------------------------------ closed form, by hand
def test_trace_covariance_on_three_hand_computed_cases():
    # v = (1, 0), (0, 2), (0, 0): ||v||^2 = 1, 4, 0; mean = (1/3, 2/3), ||mean||^2 = 5/9.
    sq, mean_sq = stats(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    # uniform, b = 1: sum ||v||^2 / (B^2 q) = 5/3, minus 5/9 -> 10/9
    assert trace_covariance(sq, mean_sq, torch.full((3,), 1 / 3), 1).item() == pytest.approx(10 / 9)
    # q = (1/3, 2/3, 0), b = 2: 1/(9/3) + 4/(9 * 2/3) = 1; (1 - 5/9) / 2 = 2/9. The zero gradient
    # may have probability 0 without biasing the estimator.
    q = torch.tensor([1 / 3, 2 / 3, 0.0])
    assert trace_covariance(sq, mean_sq, q, 2).item() == pytest.approx(2 / 9)
    # a non-zero gradient with probability 0: the estimator is biased, its variance infinite
    assert math.isinf(trace_covariance(sq, mean_sq, torch.tensor([0.0, 1.0, 0.0]), 1).item())


def test_gradient_norm_distribution_is_the_minimum_by_hand():
    # v = (3, 0), (0, 1): ||mean||^2 = 1.5^2 + 0.5^2 = 2.5.
    sq, mean_sq = stats(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    uniform = trace_covariance(sq, mean_sq, torch.tensor([0.5, 0.5]), 1).item()
    optimal = trace_covariance(sq, mean_sq, torch.tensor([0.75, 0.25]), 1).item()
    assert uniform == pytest.approx((9 + 1) / (4 * 0.5) - 2.5)  # 2.5
    assert optimal == pytest.approx(9 / (4 * 0.75) + 1 / (4 * 0.25) - 2.5)  # 1.5
    # the optimum's second moment is (mean_i ||v_i||)^2 (Cauchy-Schwarz): (4 / 2)^2 = 4
    assert optimal + 2.5 == pytest.approx(4.0)
    for p in torch.linspace(0.05, 0.95, 19):
        q = torch.tensor([p, 1 - p])
        assert trace_covariance(sq, mean_sq, q, 1).item() >= optimal - 1e-12


# ------------------------------------------------------------------ closed form vs Monte Carlo
@pytest.mark.parametrize("distribution", ["uniform", "skewed", "gradient_norm"])
def test_closed_form_matches_monte_carlo(distribution):
    gen = torch.Generator().manual_seed(0)
    B, b, trials = 12, 4, 200_000
    v = torch.randn(B, 5, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3, B)[:, None]
    q = {
        "uniform": torch.full((B,), 1 / B, dtype=torch.float64),
        "skewed": torch.rand(B, generator=gen, dtype=torch.float64) + 0.05,
        "gradient_norm": v.norm(dim=1),
    }[distribution]
    q = q / q.sum()
    positions = torch.multinomial(q, trials * b, replacement=True, generator=gen).view(trials, b)
    weights = importance_weights(q, positions)  # the sampler's w_i = 1 / (B q_i)
    estimates = (weights[..., None] * v[positions]).mean(1)  # (trials, 5)
    torch.testing.assert_close(estimates.mean(0), v.mean(0), atol=0.02, rtol=0)  # unbiased
    sampled = estimates.var(0).sum().item()
    exact = trace_covariance(*stats(v), q, b).item()
    assert sampled == pytest.approx(exact, rel=0.02)


def test_a_point_never_drawn_gives_a_bias_that_matches_monte_carlo():
    gen = torch.Generator().manual_seed(1)
    B, b, trials = 6, 3, 200_000
    v = torch.randn(B, 4, generator=gen, dtype=torch.float64)
    q = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)  # point 0: never drawn
    sq, mean = v.pow(2).sum(1), v.mean(0)
    trace, bias_sq = estimator_error(sq, mean, v[0] / B, q, b)
    assert bias_sq == pytest.approx(v[0].pow(2).sum().item() / B**2)
    assert math.isinf(trace_covariance(sq, mean.pow(2).sum(), q, b).item())
    positions = torch.multinomial(q, trials * b, replacement=True, generator=gen).view(trials, b)
    estimates = (importance_weights(q, positions)[..., None] * v[positions]).mean(1)
    assert estimates.var(0).sum().item() == pytest.approx(trace, rel=0.02)
    sampled_bias_sq = (estimates.mean(0) - mean).pow(2).sum().item()
    assert sampled_bias_sq == pytest.approx(bias_sq, rel=0.05)
    # with every point drawable, the same function is the closed form and the bias is zero
    q = torch.full((B,), 1 / B, dtype=torch.float64)
    trace, bias_sq = estimator_error(sq, mean, torch.zeros(4, dtype=torch.float64), q, b)
    assert trace == pytest.approx(trace_covariance(sq, mean.pow(2).sum(), q, b).item())
    assert bias_sq == 0


def test_rank_correlation_averages_ties_like_pandas():
    a, b = torch.tensor([1.0, 2.0, 2.0, 3.0, 0.5]), torch.tensor([1.0, 2.0, 3.0, 4.0, 2.0])
    expected = pd.Series(a.numpy()).corr(pd.Series(b.numpy()), method="spearman")
    assert rank_correlation(a, b) == pytest.approx(expected)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation(torch.ones(4), b[:4]))


# ------------------------------------------------------------------ on a network
def tiny_problem():
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, hidden_sizes=(8,))
    return model, torch.randn(21, 1, 4, 4), torch.randint(0, 3, (21,))


def test_gradient_statistics_stream_the_per_sample_gradients():
    model, x, y = tiny_problem()
    mask = torch.arange(21) % 3 == 0
    sq, mean, (masked,) = gradient_statistics(model, x, y, chunk_size=5, masks=[mask])  # 4 x 5 + 1
    v = per_sample_gradients(model, x, y).double()
    close = dict(rtol=1e-5, atol=1e-8)  # reduced in float32 (the gradients' precision)
    torch.testing.assert_close(sq, v.pow(2).sum(1), **close)
    torch.testing.assert_close(mean, v.mean(0), **close)
    torch.testing.assert_close(masked, v[mask].sum(0) / 21, **close)
    torch.testing.assert_close(sq.sqrt().float(), gradient_norm_scores(model, x, y))


def test_gradient_statistics_need_no_per_sample_gradients_and_are_exact_on_a_resnet():
    """BatchNorm (eval), residual connections, chunks and masks that cross chunk boundaries, in
    float64 against the torch.func oracle that forms every per-sample gradient."""
    torch.manual_seed(0)
    model = WideResNet((3, 8, 8), 3, depth=10, widen_factor=1).double().eval()
    x, y = torch.randn(7, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (7,))
    masks = [torch.arange(7) % 2 == 0, torch.zeros(7, dtype=torch.bool)]
    sq, mean, (even, empty) = gradient_statistics(model, x, y, chunk_size=3, masks=masks)
    v = per_sample_gradients(model, x, y)
    exact = dict(rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(sq, v.pow(2).sum(1), **exact)
    torch.testing.assert_close(mean, v.mean(0), **exact)
    torch.testing.assert_close(even, v[masks[0]].sum(0) / 7, **exact)
    assert empty.abs().max() == 0
    assert all(p.grad is None for p in model.parameters())


def test_measure_compares_every_distribution_to_uniform_and_to_the_optimum():
    model, x, y = tiny_problem()
    model.train()
    rows = {r["score"]: r for r in measure(model, x, y, batch_size=4, chunk_size=8)}
    assert model.training  # measured in eval mode, mode restored
    assert list(rows) == list(DISTRIBUTIONS)
    uniform, optimal = rows["uniform"], rows["gradient_norm"]
    assert uniform["variance_ratio"] == 1.0 and uniform["tau_hat"] == pytest.approx(1.0)
    assert optimal["tv_distance"] == 0 and optimal["spearman"] == pytest.approx(1.0)
    assert math.isnan(uniform["spearman"])
    for r in rows.values():  # the gradient-norm distribution minimises Tr Cov
        assert optimal["trace_cov"] <= r["trace_cov"] * (1 + 1e-9)
        assert r["tau_measured"] == pytest.approx(uniform["trace_cov"] / r["trace_cov"])
        assert r["variance_reduction"] == pytest.approx(1 - r["variance_ratio"])
    # brute force from the full matrix of per-sample gradients, uniform q, b = 4
    v = per_sample_gradients(model, x, y).double()
    brute = ((v - v.mean(0)).pow(2).sum(1).mean() / 4).item()
    assert uniform["trace_cov"] == pytest.approx(brute, rel=1e-6)


# ------------------------------------------------------------------ in a run
def read_variance(run_dir: Path) -> list[dict]:
    with open(run_dir / "variance.csv") as f:
        return list(csv.DictReader(f))


SMALL_RUN = [
    "trainer.time_budget=null",
    "trainer.max_steps=20",
    "trainer.eval_every_seconds=null",
    "trainer.eval_every_steps=5",
    "trainer.progress=false",
    "sampler.batch_size=32",
    "sampler.tau_threshold=1.0",
]


def test_callback_writes_variance_csv_at_its_cadence(compose, tmp_path):
    from importance_sampling.config import builder

    builder.run(compose(*SMALL_RUN, "variance.every_rows=2"), tmp_path)
    rows = read_variance(tmp_path)
    assert list(rows[0]) == list(VARIANCE_COLUMNS)
    # metrics rows at steps 0, 5, 10, 15, 20: every second one is measured
    assert [int(r["step"]) for r in rows] == [s for s in (0, 10, 20) for _ in DISTRIBUTIONS]
    assert [r["score"] for r in rows[:4]] == list(DISTRIBUTIONS)
    assert {int(r["presample_size"]) for r in rows} == {96}  # the sampler's B = 3 b
    assert {int(r["batch_size"]) for r in rows} == {32}
    metrics = pd.read_csv(tmp_path / "metrics.csv").set_index("step")
    # the trainer's tau beside the measured one, as in metrics.csv
    assert float(rows[-1]["trainer_tau"]) == pytest.approx(metrics.tau[20]) and metrics.tau[20] > 0
    table = pd.read_csv(tmp_path / "variance.csv")
    assert (table.query("score == 'gradient_norm'").variance_ratio <= 1 + 1e-9).all()


def test_callback_is_off_by_default_and_measures_the_end_of_a_run(compose, tmp_path):
    from importance_sampling.config import builder

    builder.run(compose(*SMALL_RUN), tmp_path / "off")
    assert not (tmp_path / "off" / "variance.csv").exists()
    builder.run(
        compose(
            *SMALL_RUN,
            "trainer.max_steps=17",
            "variance.every_rows=3",
            "variance.presample_size=50",
            "variance.batch_size=10",
        ),
        tmp_path / "on",
    )
    rows = read_variance(tmp_path / "on")
    assert sorted({int(r["step"]) for r in rows}) == [0, 15, 17]  # rows 0 and 3, then the end
    assert {(r["presample_size"], r["batch_size"]) for r in rows} == {("50", "10")}


def test_ordering_holds_counts_the_points_where_the_papers_orderings_hold():
    rows = []
    for step, reductions in [(0, (0.0, 0.1, 0.2, 0.3)), (1, (0.0, 0.3, 0.2, 0.4))]:
        for score, vr, tv in zip(DISTRIBUTIONS, reductions, (0.3, 0.2, 0.1, 0.0), strict=True):
            rows.append({"step": step, "score": score, "variance_reduction": vr, "tv_distance": tv})
    assert ordering_holds(pd.DataFrame(rows)) == {"points": 2, "variance": 0.5, "distance": 1.0}


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """scripts/variance_reduction.py trains a small run with the measurement on."""
    out = tmp_path_factory.mktemp("script")
    env = {**os.environ, "IS_DATA_DIR": str(out / "data")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "variance_reduction.py"),
            "--train",
            str(out / "run"),
            "--every-rows",
            "1",
            *SMALL_RUN,
        ],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out / "run", proc.stdout


@pytest.mark.slow
def test_script_trains_measures_and_plots(script_run):
    run_dir, stdout = script_run
    assert len(read_variance(run_dir)) == 5 * len(DISTRIBUTIONS)
    assert (run_dir / "variance_reduction.png").stat().st_size > 10_000
    assert "variance reduction" in stdout and "upper_bound" in stdout


@pytest.mark.slow
def test_notebook_runs_on_a_small_run(script_run):
    import nbformat
    from nbclient import NotebookClient

    run_dir, _ = script_run
    nb = nbformat.read(ROOT / "notebooks" / "variance_reduction.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
    os.environ["RUN_DIR"] = str(run_dir)
    try:
        NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}
        ).execute()
    finally:
        del os.environ["RUN_DIR"]
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2


def test_script_measures_the_checkpoint_of_a_run_that_did_not_measure(compose, tmp_path):
    import importlib.util

    from omegaconf import OmegaConf

    from importance_sampling.config import builder

    cfg = compose(*SMALL_RUN, "trainer.checkpoint_every=10", "trainer.checkpoint_unit=steps")
    builder.run(cfg, tmp_path)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # as train.py's Hydra run does
    assert not (tmp_path / "variance.csv").exists()
    spec = importlib.util.spec_from_file_location("vr", ROOT / "scripts" / "variance_reduction.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.measure_checkpoint(tmp_path)
    rows = read_variance(tmp_path)
    assert [(r["step"], r["score"]) for r in rows] == [("20", s) for s in DISTRIBUTIONS]
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert float(rows[0]["trainer_tau"]) == pytest.approx(metrics.tau.iloc[-1])


def test_a_resumed_run_keeps_the_measurements_up_to_its_checkpoint(compose, tmp_path):
    import shutil

    from importance_sampling.config import builder

    every = [
        "trainer.checkpoint_every=10",
        "trainer.checkpoint_unit=steps",
        "variance.every_rows=1",
    ]
    builder.run(compose(*SMALL_RUN, *every, "trainer.max_steps=10"), tmp_path)
    shutil.copy(tmp_path / "checkpoint.pt", tmp_path / "step10.pt")
    builder.run(
        compose(*SMALL_RUN, *every, "trainer.max_steps=15", "trainer.resume=true"), tmp_path
    )
    assert sorted({int(r["step"]) for r in read_variance(tmp_path)}) == [0, 5, 10, 15]
    # as if killed after the row at step 15 but before its checkpoint: resume from step 10
    shutil.move(tmp_path / "step10.pt", tmp_path / "checkpoint.pt")
    builder.run(compose(*SMALL_RUN, *every, "trainer.resume=true"), tmp_path)
    steps = [int(r["step"]) for r in read_variance(tmp_path)]
    assert steps == [s for s in (0, 5, 10, 15, 20) for _ in DISTRIBUTIONS]  # 15 redone, once
    assert list(pd.read_csv(tmp_path / "metrics.csv").step) == [0, 5, 10, 15, 20]

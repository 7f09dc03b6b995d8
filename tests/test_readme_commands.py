"""Every shell command of the README and of docs/*.md runs as written, with a small budget, in a
copy of the repository.

Each command of their ```bash blocks is matched by one rule below: run it (with a few
seconds of budget and one seed, rewritten by the rule), or skip it for a stated reason (a GPU,
a cluster, an account, the network, or the set-up commands CI itself runs). A command that no
rule matches fails the test: a new documented command must be run or explicitly excused here.
The commands run in order in one temporary copy of the repository, so later ones find what
earlier ones wrote (``multirun/<time>`` is the newest sweep, ``<date>_<time>`` likewise).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAMP = r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}"
# half a second of training, three metrics rows on 200 training points (and 200 test images where
# the dataset has the option): what a command needs to show it works, not what it would measure
TRAIN_BUDGET = [
    "trainer.time_budget=0.5",
    "trainer.eval_every_seconds=0.25",
    "trainer.progress=false",
    "trainer.train_eval_size=200",
]
HAS_TEST_SIZE = r"fashion_mnist|pixel_mnist"  # datasets whose config has dataset.test_size

SKIP = [  # (pattern, reason)
    (r"^make (train|test)\b", "set-up: CI runs `make test`; `make train` builds .venv"),
    (r"^source \.venv/bin/activate$", "set-up: the tests run in the venv already"),
    (
        r"^make notebooks\b|jupyter nbconvert",
        "tests/test_sweeps.py runs the notebook commands as written",
    ),
    (r"apt-get install", "installs Debian packages (make test does it as root)"),
    (r"local_slurm\.sh|^sinfo\b|hydra/launcher=slurm", "tests/test_slurm.py runs SLURM for real"),
    (
        r"^python train\.py -m hydra/launcher=(joblib|submitit_local) ",
        "tests/test_sweeps.py runs a multirun through each of these launchers",
    ),
    (r"^jupyter lab\b", "interactive: opens a browser"),
    (r"^wandb |WANDB_MODE=online|logger\.mode=online", "needs a W&B account and the internet"),
    (
        r"wandb-<sweep id>|--wandb |WANDB_SWEEP=",
        "a W&B sweep's folder or its API path: tests/test_wandb_sweep.py runs a sweep as the agent "
        "does and reads it back these ways",
    ),
    (r"device=cuda|--scale gpu|nproc_per_node=8|--nnodes", "needs GPUs or several nodes"),
    (r"experiment=(cifar10|cifar100)_wrn(?!.*scale=cpu)", "needs the CIFAR download and a GPU"),
    (r"experiment=finetune_resnet(?!.*scale=cpu)", "needs MIT67 or ImageNet and GPUs"),
    (
        r"^git clone|^sed -i .*InfoBatch",
        "the official InfoBatch code, from GitHub (outside the repo)",
    ),
    (
        r"scripts/bench\.py .*--threads",
        "the make bench report at another thread count: `make bench` runs the same code",
    ),
    (
        r"tuned_comparison\.py fashion_mnist_(mlp|cnn)(?!.*--report-only)",
        "the whole protocol takes hours; the tiny digits command runs the same code",
    ),
    (
        r"tuned_comparison\.py digits_mlp .*--validation-size 300",
        "the tiny protocol: tests/test_tuned_comparison.py runs it (2 seeds, --protocol-dir, --out)",
    ),
]


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(documents: list[Path] = DOCUMENTS) -> list[str]:
    text = "\n".join(path.read_text() for path in documents)
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(strip_comment(line))
    return out


def without_destination(command: str) -> tuple[str, ...]:
    """The command's words, in order-free form, without ``--out X`` / ``--results X``: a
    command that only adds a destination to another one (a reference's regeneration) runs the
    same code."""
    words, kept = shlex.split(command), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("--out", "--results"):
            skip = True
        else:
            kept.append(word)
    return tuple(sorted(kept))


def distinct(commands: list[str]) -> list[str]:
    """``commands`` without those that another one repeats with a destination added (the one
    with the destination is kept, where it stands)."""
    with_destination = {
        without_destination(c) for c in commands if ("--out" in c or "--results" in c)
    }
    return [
        c
        for c in commands
        if "--out" in c or "--results" in c or without_destination(c) not in with_destination
    ]


def strip_comment(line: str) -> str:
    """The command without its trailing ``# comment`` (a # outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line


def small(args: list[str], command: str = "") -> list[str]:
    """Overrides of a training command cut to a second and one seed."""
    out = []
    for a in args:
        key, _, value = a.partition("=")
        if key in ("seed",) and "," in value:
            a = f"seed={value.split(',')[0]}"
        elif key == "trainer.time_budget" and value != "null":
            continue
        elif key == "trainer.max_steps":
            a = f"trainer.max_steps={min(int(value), 20)}"
        elif key == "trainer.eval_every_steps":
            a = "trainer.eval_every_steps=5"
        elif key == "trainer.eval_every_seconds" and value != "null":
            continue
        out.append(a)
    if re.search(HAS_TEST_SIZE, command) and "dataset=image_folder" not in command:
        out.append("dataset.test_size=200")
    if "trainer.time_budget=null" in out:
        return [*out, "trainer.progress=false", "trainer.train_eval_size=200"]
    return [*out, *TRAIN_BUDGET]


def rewrite(command: str, repo: Path) -> list[str]:
    """The command to run for a README command (argv), with small budgets and placeholders."""
    if "<time>" in command:  # the newest plain multirun (train.py -m: multirun/<date>_<time>)
        stamped = [p for p in (repo / "multirun").iterdir() if re.fullmatch(STAMP, p.name)]
        command = command.replace("multirun/<time>", str(max(stamped, key=os.path.getmtime)))
    argv = shlex.split(command)
    env_prefix = []
    while "=" in argv[0] and not argv[0].startswith("-"):
        env_prefix.append(argv.pop(0))
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        split = argv.index("train.py") + 1
        return env_prefix + argv[:split] + small(argv[split:], command)
    if argv[0] == "jupyter":
        return env_prefix + [sys.executable, "-m", "jupyter", *argv[1:]]
    if argv[:2] == ["make", "bench"]:  # the recipe's script, at sizes for a check
        return env_prefix + [
            sys.executable,
            "scripts/bench.py",
            "--quick",
            "--out",
            "outputs/bench.md",
        ]
    if argv[:2] == [
        "make",
        "gpu-check",
    ]:  # no GPU here: the one-line answer (test_bench.py: the rest)
        return env_prefix + [sys.executable, "scripts/gpu_check.py"]
    if argv[:2] == ["python", "scripts/bench.py"]:
        return env_prefix + [sys.executable, *argv[1:], "--quick"]
    if argv[:2] == ["python", "scripts/gpu_check.py"]:
        return env_prefix + [sys.executable, *argv[1:]]
    assert argv[0] == "python", f"a README command that no rule knows: {command}"
    script, args = argv[1], argv[2:]
    python = [sys.executable, script]
    if script == "train.py":
        return env_prefix + python + small(args, command)
    if script == "scripts/time_to_loss.py":
        if "--seeds" in args:
            i = args.index("--seeds")
            end = i + 1
            while end < len(args) and args[end].isdigit():
                end += 1
            args = args[:i] + args[end:]
        rest = [a for a in args if "=" in a and not a.startswith("-")]
        flags = [a for a in args if a not in rest]
        return env_prefix + python + flags + ["--seeds", "0"] + small(rest, command)
    if script == "scripts/variance_reduction.py":
        if "--train" not in args:
            return env_prefix + python + args
        rest = [a for a in args if "=" in a and not a.startswith("-")]
        flags = [a for a in args if a not in rest]
        return env_prefix + python + flags + small(rest, command) + ["variance.presample_size=96"]
    if script == "scripts/benchmark_scale.py":
        return env_prefix + python + args + ["--blocks", "1", "--steps", "5", "--ddp-steps", "10"]
    if script == "scripts/benchmark_step.py":
        return env_prefix + python + args + ["--presets", "fashion_mnist_mlp", "--reps", "2"]
    if script == "scripts/fashion_mnist_png.py":
        return env_prefix + python + args + ["--train-size", "1000", "--test-size", "200"]
    if script in ("scripts/aggregate.py", "scripts/tuned_comparison.py"):
        return env_prefix + python + args  # the tiny protocol and --report-only, as written
    raise AssertionError(f"a README command that no rule knows: {command}")


def skipped(command: str) -> str | None:
    for pattern, reason in SKIP:
        if re.search(pattern, command):
            return reason
    return None


def repository_copy(dest: Path) -> Path:
    """A copy of the repository as a clone has it (tracked files only), results/ included."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def test_every_readme_command_is_run_or_excused_for_a_reason(tmp_path):
    (tmp_path / "multirun" / "2026-01-01_00-00-00").mkdir(parents=True)  # for multirun/<time>
    unknown = []
    for command in commands():
        if skipped(command):
            continue
        try:
            rewrite(command, tmp_path)
        except AssertionError:
            unknown.append(command)
    assert not unknown, "README commands with no rule in tests/test_readme_commands.py"


class CommandsOfADocument:
    """Runs every command of one document, in order, in its own copy of the repository (a
    class per document: pytest-xdist's --dist loadscope runs the documents side by side)."""

    document: Path

    @pytest.mark.slow
    def test_every_command_runs(self, tmp_path):
        repo = repository_copy(tmp_path / "repo")
        env = {
            **os.environ,
            "WANDB_MODE": "disabled",
            # the copy's own data folder, as in a clone: Fashion-MNIST is copied there from
            # Debian's files on first use, and the PNG tree a command writes is read from it
            "IS_DATA_DIR": str(repo / "data"),
            "PYTHONPATH": str(repo / "src"),
        }
        ran, failed, took = 0, [], []
        for command in distinct(commands([self.document])):
            if skipped(command):
                continue
            sweeps = repo / "multirun"
            if "<time>" in command and not (sweeps.is_dir() and any(sweeps.iterdir())):
                continue  # the sweep it reads came from an excused command (e.g. SLURM's)
            argv = rewrite(command, repo)
            env_prefix = {}
            while "=" in argv[0] and not argv[0].startswith("/"):
                key, _, value = argv.pop(0).partition("=")
                env_prefix[key] = value
            start = time.perf_counter()
            proc = subprocess.run(
                argv,
                cwd=repo,
                env={**env, **env_prefix},
                capture_output=True,
                text=True,
                timeout=600,
            )
            took.append((time.perf_counter() - start, command))
            ran += 1
            if proc.returncode != 0:
                failed.append(f"{command}\n  ran: {shlex.join(argv)}\n  {proc.stderr[-1500:]}")
        for seconds, command in sorted(took, reverse=True)[:5]:  # shown with pytest -s
            print(f"{seconds:6.1f} s  {command[:120]}")
        assert not failed, "\n\n".join(failed)


for _document in DOCUMENTS:  # TestCommandsOf_README, TestCommandsOf_usage, ...
    _name = f"TestCommandsOf_{_document.stem.replace('-', '_')}"
    globals()[_name] = type(_name, (CommandsOfADocument,), {"document": _document})


def test_the_documents_run_enough_commands():
    ran = [c for c in distinct(commands()) if not skipped(c)]
    assert len(ran) >= 25

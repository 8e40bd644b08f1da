"""Shared test helpers: run the real entry points as subprocesses, the way a user does; and the
test tiers. A test is in the end-to-end tier (marker ``e2e``) when it, or a fixture it uses,
starts a process (train.py, eval.py, tensorboard, DDP workers): ``make test-fast`` deselects
them and refuses any subprocess run that slips through, so the fast tier stays in-process."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# `make test-fast` runs the fast tier in one pytest-xdist worker per core: one torch thread each,
# so that the workers do not fight over the cores (set before anything imports torch)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
# small and fast: every subprocess run in the suite starts from these overrides
FAST = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "callbacks.rich_progress_bar=null",
    "model.net.widths=[8,16]",
    "data.batch_size=64",
]


# what starts another process: the helpers below, subprocess, multiprocessing's spawn
STARTS_A_PROCESS = re.compile(r"\b(run_script|run_sweep|train_run|subprocess\.|Popen|mp\.spawn)\b")
FAST_TIER = "NORMLAB_FAST_TIER"  # set by `make test-fast`


def _source(func) -> str:
    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return ""


def _calls(names: set[str]) -> re.Pattern | None:
    return re.compile(r"\b(" + "|".join(map(re.escape, sorted(names))) + r")\(") if names else None


def _starts(source: str, starters: re.Pattern | None) -> bool:
    return bool(STARTS_A_PROCESS.search(source) or (starters and starters.search(source)))


def _process_starters(module) -> re.Pattern | None:
    """The module's functions that start a process, directly or through one another (a fixture
    calling a ``train(...)`` helper that calls ``run_script``), as a pattern of their calls."""
    funcs = {
        name: f
        for name, f in vars(module).items()
        if inspect.isfunction(f) and f.__module__ == module.__name__
    }
    starters: set[str] = set()
    while True:
        pattern = _calls(starters)
        new = {n for n, f in funcs.items() if n not in starters and _starts(_source(f), pattern)}
        if not new:
            return pattern
        starters |= new


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``e2e`` every test that starts a process itself, through a fixture, or through a
    helper function of its module."""
    starters: dict[str, re.Pattern | None] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        if module.__name__ not in starters:
            starters[module.__name__] = _process_starters(module)
        funcs = [getattr(item, "function", None)]
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures is not None:
            funcs += [d.func for defs in fixtures.name2fixturedefs.values() for d in defs]
        if any(_starts(_source(f), starters[module.__name__]) for f in funcs if f is not None):
            item.add_marker(pytest.mark.e2e)


def _refuse_in_fast_tier() -> None:
    if os.environ.get(FAST_TIER):
        pytest.fail("this test starts train.py/eval.py: make test-fast runs in-process tests only")


@dataclass
class Run:
    """A finished subprocess run of train.py / eval.py."""

    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_script(
    script: str,
    *overrides: str,
    run_dir: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> Run:
    """Run ``python <script> overrides...`` from the repo root with its run dir at ``run_dir``
    and its log dir at ``log_dir`` (default: beside it); returns the exit code, output and run
    dir."""
    _refuse_in_fast_tier()
    cmd = [
        sys.executable,
        str(ROOT / script),
        *overrides,
        f"hydra.run.dir={run_dir}",
        f"paths.log_dir={log_dir or run_dir.parent / 'logs'}",
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, run_dir)


def run_sweep(
    *overrides: str, sweep_dir: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``python train.py -m overrides...`` with its sweep dir at ``sweep_dir`` and its log dir
    beside it; ``.stdout`` / ``.stderr`` hold the output."""
    _refuse_in_fast_tier()
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.log_dir={sweep_dir.parent / 'logs'}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def train_run(tmp_path: Path):
    """``train_run(*overrides, name="run")`` runs train.py with the FAST overrides first."""

    def _run(*overrides: str, name: str = "run", fast: bool = True, **kwargs) -> Run:
        args = [*(FAST if fast else []), *overrides]
        return run_script("train.py", *args, run_dir=tmp_path / name, **kwargs)

    return _run

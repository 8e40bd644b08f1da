"""The whole-process benchmark compares like with like: train.py and the two hand-written loops
(scripts/plain_train.py, scripts/lean_train.py) run the same optimizer steps, and a baseline that
does other work stops the benchmark instead of flattering (or blaming) normlab."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import _bench_process  # noqa: E402

# compare() starts train.py and the baselines as processes (conftest cannot see that from here)
pytestmark = pytest.mark.e2e

# one digits epoch: 1257 training images in batches of 64 -> 20 steps, on every side
DIGITS = (["trainer.max_epochs=1", "callbacks=none", "logger=csv"], ["--epochs", "1"], {})


def test_the_three_processes_run_the_same_steps(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        _bench_process, "JOBS", {"digits": (*DIGITS[:1], [*DIGITS[1], "--batch-size", "64"], {})}
    )
    jobs = _bench_process.compare(tmp_path, repeats=1)
    job = jobs["digits"]
    assert job["steps"] == 20
    for variant in _bench_process.VARIANTS:
        spread = job[variant]["wall"]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"]
        assert job[variant]["cpu"]["median"] == pytest.approx(
            job[variant]["user"]["median"] + job[variant]["sys"]["median"], abs=0.02
        )
    assert set(job["ratios_to_lean"]) == {"normlab", "plain"}


def test_a_baseline_doing_other_work_stops_the_benchmark(tmp_path: Path, monkeypatch) -> None:
    # batches of 32 take 40 steps where train.py (digits: batch 64) takes 20
    job = (DIGITS[0], [*DIGITS[1], "--batch-size", "32"], {})
    monkeypatch.setattr(_bench_process, "JOBS", {"digits": job})
    with pytest.raises(
        RuntimeError, match=r"different numbers of steps: .*'normlab': \{20\}.*\{40\}"
    ):
        _bench_process.compare(tmp_path, repeats=1)


def test_the_baselines_load_their_data_without_lightning() -> None:
    # the hand-written loops would otherwise pay Lightning's import floor and flatter normlab
    import subprocess

    code = "import sys, normlab.data.sources; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

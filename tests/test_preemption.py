"""Preemption: SIGTERM (the SLURM pattern) or Ctrl-C mid-training saves checkpoints/last.ckpt and
exits cleanly (143 / 130, no traceback); ``ckpt_path=last`` then finishes the run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, ROOT, run_script

STEPS_PER_EPOCH = 5
LONG = [
    *FAST,
    "callbacks=no_inspection",
    "trainer.max_epochs=50",
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
]


def _start_training(log_dir: Path, out: Path) -> subprocess.Popen:
    """train.py in the background, with Ctrl-C delivered as in a terminal (SIGINT not ignored)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *LONG, f"paths.log_dir={log_dir}"],
        cwd=ROOT,
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_first_epoch(log_dir: Path, proc: subprocess.Popen, timeout: float = 400) -> Path:
    """The run dir, once its first last.ckpt exists (training is then in its second epoch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(log_dir.glob("train/runs/*/checkpoints/last.ckpt"))
        if found:
            return found[0].parents[1]
        assert proc.poll() is None, "train.py ended before its first epoch finished"
        time.sleep(0.2)
    raise TimeoutError("no checkpoint after the first epoch")


@pytest.mark.slow
def test_sigterm_and_ctrl_c_save_a_resumable_checkpoint(tmp_path: Path) -> None:
    runs = {}
    for name in ("term", "int"):
        # the SIGTERM run logs where run_script(run_dir=tmp_path / ...) points paths.log_dir
        log_dir = tmp_path / ("logs" if name == "term" else "logs_int")
        runs[name] = (log_dir, _start_training(log_dir, tmp_path / f"{name}.out"))
    for name, signum in (("term", signal.SIGTERM), ("int", signal.SIGINT)):
        log_dir, proc = runs[name]
        run_dir = _wait_for_first_epoch(log_dir, proc)
        runs[name] = (log_dir, proc, run_dir, time.time())
        proc.send_signal(signum)

    for name, (_, proc, run_dir, signalled) in runs.items():
        proc.wait(timeout=300)
        output = (tmp_path / f"{name}.out").read_text()
        what = "SIGTERM" if name == "term" else "Ctrl-C (SIGINT)"
        assert proc.returncode == (143 if name == "term" else 130), output[-3000:]
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        assert f"normlab: interrupted by {what} at epoch" in output
        assert output.count("normlab: interrupted by") == 1  # once, not also through the log
        assert f"saved a resumable checkpoint to {ckpt}. Resume with: python train.py" in output
        assert "Traceback" not in output
        assert not (run_dir / "results.json").exists()
        state = torch.load(ckpt, weights_only=True)
        assert state["global_step"] >= STEPS_PER_EPOCH
        assert ckpt.stat().st_mtime >= signalled  # written on the signal, not before it
        assert state["normlab"]["config"]["trainer"]["max_epochs"] == 50
        assert {"optimizer_states", "loops", "lr_schedulers"} <= state.keys()
        assert "RNGStateCheckpoint" in state["callbacks"]

    # resume the SIGTERM'd run by `ckpt_path=last`, as a requeued job would
    run_dir = runs["term"][2]
    preempted = run_dir / "checkpoints" / "last.ckpt"
    epochs = torch.load(preempted, weights_only=True)["epoch"] + 2
    resumed = run_script(
        "train.py",
        *LONG,
        f"trainer.max_epochs={epochs}",
        "ckpt_path=last",
        "test=false",
        run_dir=tmp_path / "resumed",
    )
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"ckpt_path=last: resuming {preempted}" in resumed.output
    end = torch.load(resumed.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert end["epoch"] == epochs - 1
    assert end["global_step"] == epochs * STEPS_PER_EPOCH
    assert resumed.results["checkpoints"]["last"] == str(resumed.run_dir / "checkpoints/last.ckpt")


def _interrupted_in_process(tmp_path: Path, capsys, *overrides: str) -> tuple[int, str, Path]:
    from normlab.cli import run_task
    from tests.test_configs import compose_train

    fast = [*FAST, "callbacks=no_inspection", "logger=csv", "trainer.limit_train_batches=2"]
    _, cfg = compose_train([*fast, *overrides], tmp_path / "run")
    with pytest.raises(SystemExit) as info:
        run_task("train", cfg)
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "interrupted" in ln]
    return info.value.code, line, tmp_path / "run"


def test_sigterm_while_loading_data_says_nothing_was_saved(tmp_path: Path, capsys) -> None:
    code, line, run_dir = _interrupted_in_process(
        tmp_path, capsys, "data._target_=tests.user_code.TermDuringSetup"
    )
    assert code == 143
    assert line == (
        "normlab: interrupted by SIGTERM before the training finished; nothing was saved: run"
        " the same command again"
    )
    assert not run_dir.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_a_signal_in_the_test_phase_names_the_checkpoints_and_eval(
    tmp_path: Path, capsys, signum: int
) -> None:
    code, line, run_dir = _interrupted_in_process(
        tmp_path, capsys, "+callbacks.signal._target_=tests.user_code.SignalOnTestStart",
        f"+callbacks.signal.signum={int(signum)}",
        "data.eval_batch_size=64",  # Lightning stops a test at a batch boundary, not the last
    )  # fmt: skip
    assert code == 128 + signum
    best = next(p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    what = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    assert line.startswith(f"normlab: interrupted by {what} outside training; saved: ")
    assert f"test the trained model with `python eval.py ckpt_path={best}`" in line
    assert str(run_dir / "checkpoints" / "last.ckpt") in line
    assert not (run_dir / "results.json").exists()

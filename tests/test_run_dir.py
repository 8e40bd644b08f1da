"""A run dir belongs to one run (normlab/run_dir.py). Two ``train.py ... hydra.run.dir=X`` started
together both exited 0 with one run's results.json beside the other's checkpoint and one
interleaved log; started one after the other, the second replaced the first's checkpoints and
results. Now the second refuses before writing anything, naming the holder's pid or the finished
run, and resuming into the dir stays allowed; DDP ranks > 0 join their rank 0's dir."""

from __future__ import annotations

import fcntl
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from normlab.run_dir import (
    RunDirError,
    check_resumes_here,
    claim_run_dir,
    created_by_this_run,
    release_run_dir,
)
from tests.conftest import FAST, run_script


@pytest.fixture
def claims():
    """Claims made by a test are given up after it (the process outlives the test)."""
    made: list[Path] = []
    yield made
    for path in made:
        release_run_dir(path)


def _finished(run_dir: Path) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    (run_dir / "results.json").write_text("{}")
    return run_dir


def test_a_dir_held_by_a_live_run_is_refused_naming_its_pid(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running train.py holds
        os.write(fd, b"4242\n")
        with pytest.raises(RunDirError, match=r"is in use by another run \(pid 4242"):
            claim_run_dir(run_dir)
    finally:
        os.close(fd)  # what the OS does when that run dies
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


def test_a_lock_left_by_a_dead_run_does_not_block(tmp_path: Path, claims: list) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("4242\n")  # its holder is gone: no flock on it
    claim_run_dir(run_dir)
    claims.append(run_dir)
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
    assert created_by_this_run(run_dir) is False


def test_a_finished_run_is_refused_unless_resumed_from_inside(tmp_path: Path, claims) -> None:
    run_dir = _finished(tmp_path / "run")
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(RunDirError) as info:
        claim_run_dir(run_dir, ckpt_path=str(tmp_path / "elsewhere.ckpt"))
    msg = str(info.value)
    assert f"={run_dir} already holds a finished run (results.json, checkpoints)" in msg
    assert f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in msg
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written, not even a lock
    with pytest.raises(RunDirError, match="already holds a finished run"):  # eval.py never resumes
        claim_run_dir(run_dir, ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"), resume=False)

    claim_run_dir(run_dir, ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"))
    claims.append(run_dir)
    other = _finished(tmp_path / "other")
    claim_run_dir(other, ckpt_path="last")  # `last` is checked again once resolved
    claims.append(other)
    check_resumes_here(other, str(other / "checkpoints" / "last.ckpt"))
    with pytest.raises(RunDirError, match="already holds a finished run"):  # a newer run's
        check_resumes_here(other, str(tmp_path / "newer" / "checkpoints" / "last.ckpt"))


def test_a_finished_sweep_is_refused(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _finished(sweep / "0")
    with pytest.raises(RunDirError, match=r"hydra.sweep.dir=.*\(\*/results.json, \*/checkpoints\)"):
        claim_run_dir(sweep, key="hydra.sweep.dir", sweep=True)


def test_ddp_ranks_above_zero_join_the_dir(tmp_path: Path, monkeypatch) -> None:
    run_dir = _finished(tmp_path / "run")
    monkeypatch.setenv("LOCAL_RANK", "1")
    claim_run_dir(run_dir)  # rank 0 holds it; this rank writes into it too
    assert created_by_this_run(run_dir) is None


def test_a_refusal_at_fit_start_leaves_no_run_dir(tmp_path: Path, claims, capsys) -> None:
    """norm.init_from of another architecture is refused in on_fit_start, after the logger has
    created tensorboard/: the dir this run created goes, as for any refusal before training."""
    from normlab.cli import run_task
    from tests.test_configs import compose_train

    other = tmp_path / "other.ckpt"
    state = {"net.features.1.running_mean": torch.zeros(3)}
    torch.save({"normlab": {"format": 1, "config": {"norm": {"name": "batchnorm"}}},
                "state_dict": state}, other)  # fmt: skip
    run_dir = tmp_path / "run"
    fast = ["trainer=cpu", "model.net.widths=[8,16]", "callbacks=none"]
    _, cfg = compose_train([*fast, "norm=frozen", f"norm.init_from={other}"], run_dir)
    claim_run_dir(run_dir)
    claims.append(run_dir)
    with pytest.raises(SystemExit) as info:
        run_task("train", cfg)
    assert info.value.code == 2
    assert "has no running statistics of the same shape" in capsys.readouterr().err
    assert not run_dir.exists()


# -- end to end: real train.py processes ----------------------------------------------------------
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_runs_started_together_in_one_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda _: run_script("train.py", *FAST, run_dir=run_dir), range(2)))
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 2], [r.output[-2000:] for r in runs]
    winner, loser = sorted(runs, key=lambda r: r.returncode)
    pid = (run_dir / ".lock").read_text().strip()
    assert f"is in use by another run (pid {pid}, holding {run_dir / '.lock'})" in loser.stderr
    assert "Traceback" not in loser.output
    assert winner.results["epochs"] == 1 and "test/acc" in winner.results["metrics"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["state_dict"]
    log = (run_dir / "train.log").read_text()
    assert log.count("metrics: ") == 1 and log.count("run dir: ") == 1  # one run's log


def test_a_second_run_in_a_finished_dir_is_refused_and_resuming_it_is_not(tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = run_script("train.py", *FAST, run_dir=run_dir)
    assert first.returncode == 0, first.output[-2000:]
    kept = {p: _digest(p) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}

    again = run_script("train.py", *FAST, run_dir=run_dir)
    assert again.returncode == 2, again.output[-2000:]
    assert f"hydra.run.dir={run_dir} already holds a finished run" in again.stderr
    assert {p: _digest(p) for p in kept} == kept  # every file of the first run unchanged
    last = run_dir / "checkpoints" / "last.ckpt"
    evaluated = run_script("eval.py", "trainer=cpu", f"ckpt_path={last}", run_dir=run_dir)
    assert evaluated.returncode == 2 and "already holds a finished run" in evaluated.stderr

    resumed = run_script("train.py", *FAST, "trainer.max_epochs=2", f"ckpt_path={last}",
                         run_dir=run_dir)  # fmt: skip
    assert resumed.returncode == 0, resumed.output[-2000:]
    assert resumed.results["epochs"] == 2

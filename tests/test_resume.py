"""Exact resumption: 2 epochs in one go == 1 epoch, stop, resume from last.ckpt for the second.

Dropout is on, so the comparison fails unless the random state travels with the checkpoint
(RNGStateCheckpoint); the data order is a function of (seed, epoch) (EpochSeededSampler). The two
first runs start together in the same log dir, so they also show that runs started in the same
second get different run dirs (``<timestamp>_<pid>``)."""

from __future__ import annotations

import io
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import FAST, ROOT, run_script

STEPS_PER_EPOCH = 5
RESUME = [
    *FAST,
    "trainer.max_epochs=2",
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "model.net.dropout=0.3",
    "test=false",
]


def _state_dict(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(tmp_path) -> None:
    log_dir = tmp_path / "logs"
    legs = {
        "uninterrupted": RESUME,
        "first_epoch": [*RESUME, f"++trainer.max_steps={STEPS_PER_EPOCH}"],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args, f"paths.log_dir={log_dir}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in legs.items()
    }
    outputs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][-3000:]

    # started together, same task: one dir each, named <timestamp>_<pid>
    run_dirs = sorted((log_dir / "train" / "runs").iterdir())
    assert len(run_dirs) == 2
    by_pid = {}
    for run_dir in run_dirs:
        match = re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_(\d+)", run_dir.name)
        assert match, run_dir.name
        by_pid[int(match.group(1))] = run_dir
    dirs = {name: by_pid[p.pid] for name, p in procs.items()}

    # the first leg stopped at the epoch boundary, random state saved
    first = torch.load(dirs["first_epoch"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == STEPS_PER_EPOCH
    assert first["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 1
    assert "rng" in first["callbacks"]["RNGStateCheckpoint"]
    assert first["hyper_parameters"]["net"]["dropout"] == 0.3

    resumed = run_script(
        "train.py",
        *RESUME,
        f"ckpt_path={dirs['first_epoch'] / 'checkpoints' / 'last.ckpt'}",
        run_dir=tmp_path / "resumed",
    )
    assert resumed.returncode == 0, resumed.output[-3000:]
    end = torch.load(resumed.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert end["global_step"] == 2 * STEPS_PER_EPOCH

    a = _state_dict(dirs["uninterrupted"] / "checkpoints" / "last.ckpt")
    b = end["state_dict"]
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= 1e-6, f"max abs difference {diff}"
    # and the second epoch did change the weights
    moved = max((a[k].double() - first["state_dict"][k].double()).abs().max().item() for k in a)
    assert moved > 1e-3


def test_rng_state_round_trips_through_a_weights_only_checkpoint() -> None:
    from normlab.callbacks.rng_state import RNGStateCheckpoint

    def draw() -> tuple:
        mask = torch.nn.functional.dropout(torch.ones(64), 0.5, training=True)
        return mask, np.random.rand(3), random.random()

    callback = RNGStateCheckpoint()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    buffer = io.BytesIO()
    torch.save({"callbacks": {"RNGStateCheckpoint": callback.state_dict()}}, buffer)
    expected = draw()
    draw()  # move every generator on
    buffer.seek(0)
    callback.load_state_dict(
        torch.load(buffer, weights_only=True)["callbacks"]["RNGStateCheckpoint"]
    )
    got = draw()
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_a_reused_run_dir_starts_fresh_unless_asked_to_resume(tmp_path) -> None:
    # Lightning resumes fit(ckpt_path=None) from "last" when an OnExceptionCheckpoint is present;
    # normlab's preemption callback is not one, so only ckpt_path= resumes
    from tests.conftest import FAST, run_script

    first = run_script("train.py", *FAST, run_dir=tmp_path / "run")
    assert first.returncode == 0, first.output[-2000:]
    again = run_script("train.py", *FAST, run_dir=tmp_path / "run")
    assert again.returncode == 0, again.output[-2000:]
    restored = [ln for ln in again.output.splitlines() if "Restoring states from" in ln]
    assert restored and not any("last.ckpt" in ln for ln in restored)  # only test's best ckpt
    assert "was called without a model" not in again.output
    assert again.results["epochs"] == 1 and "train/loss" in again.results["metrics"]


def _lr_by_step(run_dir) -> dict[int, float]:
    """The learning rate of the first parameter group as LearningRateMonitor logged it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tag = sorted(t for t in events.Tags()["scalars"] if t.startswith("lr-"))[0]
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batchnorm", "frozen"])
def test_extending_a_finished_run_equals_the_longer_run(norm: str, tmp_path) -> None:
    # issue: the restored CosineAnnealingLR kept T_max=1, so the second epoch ran at lr 0
    args = [*FAST, f"norm={norm}", "seed=11", "test=false", "norm.calibration_batches=5"]
    if norm == "batchnorm":
        args.remove("norm.calibration_batches=5")
    short = run_script("train.py", *args, "trainer.max_epochs=1", run_dir=tmp_path / "short")
    assert short.returncode == 0, short.output[-3000:]
    whole = run_script("train.py", *args, "trainer.max_epochs=2", run_dir=tmp_path / "whole")
    assert whole.returncode == 0, whole.output[-3000:]
    extended = run_script(
        "train.py",
        *args,
        "trainer.max_epochs=2",
        f"ckpt_path={short.run_dir / 'checkpoints' / 'last.ckpt'}",
        run_dir=tmp_path / "extended",
    )
    assert extended.returncode == 0, extended.output[-3000:]
    assert "CosineAnnealingLR follows this command (T_max: 1 -> 2)" in extended.output

    # cosine over 2 epochs, from its definition: epoch 1 runs at lr0 * (1 + cos(pi / 2)) / 2
    lr0 = 0.003  # configs/model/cnn.yaml
    whole_lr, extended_lr = _lr_by_step(whole.run_dir), _lr_by_step(extended.run_dir)
    assert sorted(whole_lr.values()) == pytest.approx([lr0 / 2, lr0])
    assert list(extended_lr.values()) == pytest.approx([lr0 / 2])

    a = _state_dict(whole.run_dir / "checkpoints" / "last.ckpt")
    b = _state_dict(extended.run_dir / "checkpoints" / "last.ckpt")
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= 1e-6, f"max abs difference {diff}"
    first = _state_dict(short.run_dir / "checkpoints" / "last.ckpt")
    assert max((a[k].double() - first[k].double()).abs().max().item() for k in a) > 1e-3

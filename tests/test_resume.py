"""Resuming, every way a user does it: a run stopped after one epoch and resumed equals the
uninterrupted run (random state and data order travel with the checkpoint); a finished run
extended with a larger trainer.max_epochs equals the longer run (the LR schedule follows the
command); what ckpt_path= may resume (the model the command builds, epochs left to train, and for
``last`` the newest readable checkpoint of the task); frozen layers stay frozen.

The two first runs of the exact-resume test start together in the same log dir, so they also show
that runs started in the same second get different run dirs (``<timestamp>_<pid>``)."""

from __future__ import annotations

import copy
import io
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.errors import CheckpointError
from normlab.resume import check_resumable, config_differences, find_last_checkpoint
from tests.conftest import FAST, ROOT, run_script

STEPS_PER_EPOCH = 5
RESUME = [
    *FAST,
    "trainer.max_epochs=2",
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "model.net.dropout=0.3",
    "test=false",
]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return _load(path)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["none", "mixup_cutmix"])
def test_resumed_run_ends_with_the_same_weights(augment: str, tmp_path) -> None:
    # augment=mixup_cutmix: crops, flips, erasing and MixUp/CutMix drawn per (seed, epoch, batch)
    log_dir = tmp_path / "logs"
    args = [*RESUME, f"augment={augment}"]
    legs = {
        "uninterrupted": args,
        "first_epoch": [*args, f"++trainer.max_steps={STEPS_PER_EPOCH}"],
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
        *args,
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
    from normlab.callbacks.rng_state_checkpoint import RNGStateCheckpoint

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


def _lr_by_step(run_dir) -> dict[int, float]:
    """The learning rate of the first parameter group as LearningRateMonitor logged it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tag = sorted(t for t in events.Tags()["scalars"] if t.startswith("lr-"))[0]
    return {e.step: e.value for e in events.Scalars(tag)}


# each norm's own settings; batch renorm's warm-up (30 steps) spans the epoch boundary
EXTEND = {
    "batchnorm": [],
    "frozen": ["norm.calibration_batches=5"],
    "batchrenorm": ["norm.renorm_warmup_steps=30"],
    "ghostbatchnorm": ["norm.virtual_batch_size=16"],
    "instancenorm": [],
    "layernorm2d": [],
    "gn_ws": ["norm.num_groups=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("norm", list(EXTEND))
def test_extending_a_finished_run_equals_the_longer_run(norm: str, tmp_path) -> None:
    # issue: the restored CosineAnnealingLR kept T_max=1, so the second epoch ran at lr 0
    args = [*FAST, f"norm={norm}", "seed=11", "test=false", *EXTEND[norm]]
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


# -- what ckpt_path= may resume ------------------------------------------------------------------

CONFIG = {
    "model": {"widths": [8, 16], "optimizer": {"lr": 0.003}, "compile": False},
    "norm": {"name": "batchnorm", "momentum": 0.1, "precise_bn_batches": 0},
    "data": {"name": "digits", "batch_size": 64, "data_dir": "data"},
    "trainer": {"max_epochs": 3},
}


def _config(**changes: object) -> dict:
    cfg = copy.deepcopy(CONFIG)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def _checkpoint(path: Path, config: dict, epochs_done: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    progress = {"current": {"processed": epochs_done}}
    torch.save(
        {
            "normlab": {"format": 1, "config": config},
            "state_dict": {"w": torch.zeros(1)},
            "loops": {"fit_loop": {"epoch_progress": progress}},
        },
        path,
    )
    return path


def test_differences_name_the_overrides_that_rebuild_the_checkpoints_model() -> None:
    assert config_differences(CONFIG, _config()) == []
    # optimizer, scheduler, speed knobs, statistics re-estimation and data location may change
    same_model = _config(
        model__optimizer={"lr": 0.1},
        model__compile=True,
        norm__precise_bn_batches=5,
        data__batch_size=7,
        data__data_dir="/elsewhere",
    )
    assert config_differences(CONFIG, same_model) == []
    assert config_differences(CONFIG, _config(model__widths=[32, 64])) == ["model.widths=[8,16]"]
    assert config_differences(CONFIG, _config(norm__momentum=0.01)) == ["norm.momentum=0.1"]
    # another norm: the group override, and the checkpoint's values the current norm lacks
    other = _config(norm={"name": "groupnorm", "num_groups": 4})
    assert config_differences(CONFIG, other) == ["norm=batchnorm", "++norm.momentum=0.1"]
    assert config_differences(CONFIG, _config(data__name="mnist")) == ["data=digits"]
    # another net normlab builds: its model option, then the checkpoint's values in the group
    torchvision = _config(model__net={"_target_": "normlab.models.torchvision_net"})
    torchvision["model"]["arch"] = "resnet34"
    assert config_differences(torchvision, CONFIG) == ["model=torchvision", "++model.arch=resnet34"]


def test_a_checkpoint_of_another_model_is_refused_unless_ckpt_strict_false(tmp_path) -> None:
    path = _checkpoint(tmp_path / "frozen.ckpt", _config(norm={"name": "frozen"}))
    checkpoint = torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError) as info:
        check_resumable(checkpoint, path, CONFIG)
    message = str(info.value)
    assert f"ckpt_path={path}: it holds another model" in message
    assert "trained with norm=frozen" in message and "add ckpt_strict=false" in message
    check_resumable(checkpoint, path, {**CONFIG, "ckpt_strict": False})  # no error


def test_a_finished_checkpoint_is_refused_saying_how_to_train_on(tmp_path) -> None:
    path = _checkpoint(tmp_path / "done.ckpt", CONFIG, epochs_done=3)
    checkpoint = torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match=r"already trained 3 epoch\(s\) and trainer.max_ep"):
        check_resumable(checkpoint, path, CONFIG)
    check_resumable(checkpoint, path, _config(trainer__max_epochs=4))
    check_resumable(checkpoint, path, CONFIG, resuming=False)  # train=false: only tests it


def _aged(path: Path, age_s: float) -> Path:
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_last_is_the_newest_readable_checkpoint_of_this_model(tmp_path) -> None:
    task = tmp_path / "train"
    oldest = _aged(_checkpoint(task / "runs/a/checkpoints/last.ckpt", CONFIG), 300)
    older = _aged(_checkpoint(task / "runs/b/checkpoints/last.ckpt", CONFIG), 200)
    frozen = _config(norm={"name": "frozen"})
    newer = _aged(_checkpoint(task / "multiruns/s/1/checkpoints/last.ckpt", frozen), 100)
    newest = task / "runs/c/checkpoints/last.ckpt"
    _checkpoint(newest, CONFIG)
    newest.write_bytes(newest.read_bytes()[:100])  # a writer killed mid-save

    path, passed_over = find_last_checkpoint(task, current=CONFIG)
    assert path == older  # not the oldest one, not the truncated or the other model's
    assert len(passed_over) == 2
    assert str(newest) in passed_over[0] and "not a complete file" in passed_over[0]
    assert str(newer) in passed_over[1] and "trained with norm=frozen" in passed_over[1]
    # the frozen job of the sweep is what a norm=frozen command resumes
    assert find_last_checkpoint(task, current=frozen)[0] == newer
    # the run dir of the command itself is never a candidate
    assert find_last_checkpoint(task, exclude=older.parents[1], current=CONFIG)[0] == oldest

    other = _config(norm={"name": "groupnorm"})
    with pytest.raises(CheckpointError) as info:
        find_last_checkpoint(task, current=other)
    assert "none of the 4 checkpoints/last.ckpt" in str(info.value)
    assert "trained with norm=frozen" in str(info.value)


def test_last_refuses_when_the_newest_run_of_this_model_is_finished(tmp_path) -> None:
    task = tmp_path / "train"
    _aged(_checkpoint(task / "runs/a/checkpoints/last.ckpt", CONFIG, epochs_done=1), 100)
    done = _checkpoint(task / "runs/b/checkpoints/last.ckpt", CONFIG, epochs_done=3)
    with pytest.raises(CheckpointError, match=f"ckpt_path=last picked {done}: it has already"):
        find_last_checkpoint(task, current=CONFIG)


@pytest.mark.slow
def test_frozen_layers_stay_frozen_when_resumed_without_the_flag(tmp_path) -> None:
    common = [*FAST, "test=false", "trainer.limit_train_batches=5"]
    first = run_script(
        "train.py",
        *common,
        "trainer.max_epochs=2",
        "norm.freeze_at_epoch=1",
        run_dir=tmp_path / "first",
    )
    assert first.returncode == 0, first.output[-3000:]
    before = _load(first.run_dir / "checkpoints" / "last.ckpt")
    assert before["normlab"]["frozen_layers"] == ["net.features.1", "net.features.5"]

    resumed = run_script(  # norm.freeze_at_epoch not repeated
        "train.py",
        *common,
        "trainer.max_epochs=3",
        f"ckpt_path={first.run_dir / 'checkpoints' / 'last.ckpt'}",
        run_dir=tmp_path / "resumed",
    )
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "2 BatchNorm layers frozen as in the checkpoint" in resumed.output
    after = _load(resumed.run_dir / "checkpoints" / "last.ckpt")
    assert after["global_step"] == before["global_step"] + 5
    for layer in before["normlab"]["frozen_layers"]:
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{layer}.{stat}"
            assert torch.equal(before["state_dict"][key], after["state_dict"][key]), key
        moved = after["state_dict"][f"{layer}.weight"] - before["state_dict"][f"{layer}.weight"]
        assert moved.abs().max() > 0  # gamma keeps training
    assert after["normlab"]["frozen_layers"] == before["normlab"]["frozen_layers"]


@pytest.mark.slow
def test_resume_after_a_sweep_picks_this_norms_run(tmp_path) -> None:
    log_dir = tmp_path / "logs"
    common = [*FAST, "test=false", "trainer.limit_train_batches=3"]

    def run(name: str, *args: str):
        run_dir = log_dir / "train" / "runs" / name
        return run_script("train.py", *common, *args, run_dir=run_dir, log_dir=log_dir)

    assert run("bn", "norm=batchnorm").returncode == 0
    frozen = run("frozen", "norm=frozen", "norm.calibration_batches=2")
    assert frozen.returncode == 0

    # an explicit checkpoint of another norm: refused up front, naming the setting and the fix
    wrong = run("wrong", "norm=batchnorm", "trainer.max_epochs=2",
                f"ckpt_path={frozen.run_dir / 'checkpoints' / 'last.ckpt'}")  # fmt: skip
    assert wrong.returncode == 2
    assert "holds another model than this command builds" in wrong.stderr
    assert "trained with norm=frozen" in wrong.stderr and "ckpt_strict=false" in wrong.stderr
    assert not wrong.run_dir.exists()

    # `last` passes over the newer norm=frozen run and resumes the batchnorm one
    resumed = run("resumed", "norm=batchnorm", "trainer.max_epochs=2", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"passed over {frozen.run_dir / 'checkpoints' / 'last.ckpt'}" in resumed.output
    picked = log_dir / "train" / "runs" / "bn" / "checkpoints" / "last.ckpt"
    assert f"ckpt_path=last: resuming {picked}" in resumed.output
    assert (
        _load(resumed.run_dir / "checkpoints" / "last.ckpt")["normlab"]["config"]["norm"]["name"]
        == "batchnorm"
    )


# Every entry of the resume tables, one case each, written out here (not read from the tables:
# a key dropped from a table must fail a case). Must match: the settings that build the model or
# decide its input and output; may change: how it is optimized, sped up, where data is read from,
# and how the statistics are (re)estimated.
TABLE_CONFIG = {
    "model": {
        "_target_": "normlab.models.NormLabModule",
        "net": {"_target_": "normlab.models.ConvNet", "widths": [8, 16]},
        "arch": None,
        "activation": None,
        "weights": None,
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 0.003},
        "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR"},
        "compile": False,
        "channels_last": False,
    },
    "norm": {
        "name": "frozen",
        "eps": None,
        "freeze_affine": False,
        "calibration_batches": 20,
        "init_from": None,
        "precise_bn_batches": 0,
        "distribute_bn": False,
        "freeze_at_epoch": None,
    },
    "data": {
        "_target_": "normlab.data.NormLabDataModule",
        "name": "synthetic",
        "image_size": 16,
        "synthetic": {"shape": [3, 16, 16], "num_classes": 10},
        "batch_size": 64,
        "data_dir": "data",
        "num_workers": 0,
        "download": False,
    },
    "trainer": {"max_epochs": 3},
}
MUST_MATCH = {
    "model._target_": "my.Module",
    "model.net._target_": "my.Net",
    "model.net.widths": [32, 64],
    "model.arch": "resnet18",
    "model.activation": "sigmoid",
    "norm.eps": 0.001,
    "norm.freeze_affine": True,
    "data._target_": "my.DataModule",
    "data.name": "mnist",
    "data.image_size": 32,
    "data.synthetic.shape": [1, 16, 16],
    "data.synthetic.num_classes": 4,
}
MAY_CHANGE = {
    "model.optimizer.lr": 0.1,
    "model.optimizer._target_": "torch.optim.SGD",
    "model.scheduler": None,
    "model.compile": True,
    "model.channels_last": True,
    "model.weights": "/elsewhere/weights.pth",
    "norm.calibration_batches": 5,
    "norm.init_from": "/elsewhere/run.ckpt",
    "norm.precise_bn_batches": 8,
    "norm.distribute_bn": True,
    "norm.freeze_at_epoch": 2,
    "data.batch_size": 7,
    "data.data_dir": "/elsewhere",
    "data.num_workers": 4,
    "data.download": True,
}


def _changed(dotted: str, value: object) -> dict:
    cfg = copy.deepcopy(TABLE_CONFIG)
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value
    return cfg


@pytest.mark.parametrize("key", sorted(MUST_MATCH))
def test_each_setting_that_builds_the_model_must_match_to_resume(key: str) -> None:
    differences = config_differences(TABLE_CONFIG, _changed(key, MUST_MATCH[key]))
    # another data set or net of normlab's: a group override (data=synthetic, model=cnn)
    typed = {"data.name": "data=", "model.net._target_": "model="}.get(key, f"{key}=")
    assert len(differences) == 1 and differences[0].startswith(typed), differences


@pytest.mark.parametrize("key", sorted(MAY_CHANGE))
def test_each_setting_of_how_a_run_goes_on_may_change_on_resume(key: str) -> None:
    assert config_differences(TABLE_CONFIG, _changed(key, MAY_CHANGE[key])) == []


def test_the_overrides_a_refusal_prints_resume_the_run_when_typed_back(tmp_path) -> None:
    """A torchvision run with norm=frozen on synthetic data, resumed with the default command:
    the refusal's overrides, appended as printed, compose, pass the checks and resume it."""
    quick = ["trainer=cpu", "callbacks=no_inspection", "callbacks.rich_progress_bar=null"]
    first = run_script(
        "train.py", *quick, "trainer.max_epochs=1", "norm=frozen", "model=torchvision",
        "model.arch=resnet18", "data=synthetic", "data.synthetic.shape=[3,16,16]",
        "data.synthetic.num_samples=96", "data.synthetic.num_test=32", "data.batch_size=32",
        run_dir=tmp_path / "first",
    )  # fmt: skip
    assert first.returncode == 0, first.output[-3000:]
    resume = [*quick, "trainer.max_epochs=2", f"ckpt_path={first.results['checkpoints']['last']}"]
    refused = run_script("train.py", *resume, run_dir=tmp_path / "refused")
    assert refused.returncode == 2, refused.output[-3000:]
    [line] = [ln for ln in refused.stderr.splitlines() if ln.startswith("normlab: error: ")]
    hints = line.split("trained with ")[1].split(": to resume it")[0].split()
    assert hints[:3] == ["model=torchvision", "norm=frozen", "data=synthetic"], line
    assert "data.synthetic.shape=[3,16,16]" in hints or "++data.synthetic.shape=[3,16,16]" in hints
    resumed = run_script("train.py", *resume, *hints, run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert resumed.results["epochs"] == 2

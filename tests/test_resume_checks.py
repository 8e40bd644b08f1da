"""What ckpt_path= may resume: the checkpoint must hold the model the command builds, have epochs
left to train, and (``last``) be the newest readable one of the task; frozen layers stay frozen;
``norm.init_from`` folds conv biases instead of dropping them."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch

from normlab.errors import CheckpointError
from normlab.utils.checkpoints import check_resumable, config_differences, find_last_checkpoint
from tests.conftest import FAST, run_script

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
    # another norm: the norm alone, not each key of the two norm configs
    other = _config(norm={"name": "groupnorm", "num_groups": 4})
    assert config_differences(CONFIG, other) == ["norm=batchnorm"]
    assert config_differences(CONFIG, _config(data__name="mnist")) == ["data.name=digits"]


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


def test_init_from_folds_conv_biases_of_a_norm_affine_false_run(tmp_path) -> None:
    from normlab.callbacks.frozen_calibration import FrozenBNCalibration
    from normlab.models import NormLabModule
    from normlab.norm import frozen_layer_names
    from tests.test_norm import fake_checkpoint

    torch.manual_seed(0)
    source = NormLabModule(10, 1, {"name": "batchnorm", "affine": False}, net={"widths": [4, 6]})
    with torch.no_grad():  # statistics and biases far from their initial zeros/ones
        for name, tensor in source.state_dict().items():
            if name.endswith(("running_mean", ".bias")):
                tensor.uniform_(-1, 1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2)
    assert source.net.features[0].bias is not None
    path = fake_checkpoint(tmp_path / "bn.ckpt", source.state_dict())

    frozen = NormLabModule(10, 1, {"name": "frozen"}, net={"widths": [4, 6]})
    assert frozen.net.features[0].bias is None
    message = FrozenBNCalibration(init_from=str(path))._load(frozen, frozen_layer_names(frozen))
    assert "conv biases folded into running_mean: ['net.features.0.bias'" in message

    x = torch.randn(16, 1, 8, 8)
    source.eval(), frozen.eval()
    diff = (source(x) - frozen(x)).abs().max().item()
    assert diff <= 1e-5, diff  # without the fold: 0.3 or more


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


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

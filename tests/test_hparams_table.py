"""TensorBoard's HPARAMS tab shows, without ticking anything, what distinguishes the runs of a
comparison (the swept keys, norm.name, model.arch) beside their final metrics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from normlab.job_names import SWEPT_KEYS_ENV
from normlab.utils.results import log_hparams
from tests.test_experiments import compose_with_hydra

METRICS = {"val/acc": 0.75, "test/acc": 0.5, "val/loss": 1.0, "test/loss": 1.5, "train/acc": 0.7}


def shown_by_tensorboard(event_dir: Path) -> tuple[list[str], list[str]]:
    """The hparam and metric columns the HPARAMS tab ticks at first, as TensorBoard 2.x computes
    them: the backend sorts the experiment's hparams by (not differs, name), the dashboard ticks
    the first five of them and the first five metrics."""
    events = EventAccumulator(str(event_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")[metadata.EXPERIMENT_TAG]
    experiment = metadata.parse_experiment_plugin_data(content)
    infos = sorted(experiment.hparam_infos, key=lambda i: (not i.differs, i.name))
    return [i.name for i in infos[:5]], [m.name.tag for m in experiment.metric_infos[:5]]


def write_hparams(tmp_path: Path, *overrides: str) -> Path:
    cfg = compose_with_hydra(*overrides)
    logger = TensorBoardLogger(str(tmp_path), name="tensorboard", version="")
    trainer = SimpleNamespace(
        loggers=[logger],
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=7)),
    )
    log_hparams(trainer, cfg, METRICS)
    logger.experiment.flush()
    return Path(logger.log_dir)


def test_a_single_run_shows_its_norm_and_arch_and_final_accuracies(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(SWEPT_KEYS_ENV, raising=False)
    hparams, metrics = shown_by_tensorboard(write_hparams(tmp_path / "cnn", "norm=frozen"))
    assert hparams[0] == "norm.name"  # the ConvNet has no arch: no blank column first
    assert metrics[:2] == ["hparams/val_acc", "hparams/test_acc"]
    resnet = write_hparams(tmp_path / "resnet", "model=torchvision", "model.arch=resnet18")
    assert shown_by_tensorboard(resnet)[0][:2] == ["model.arch", "norm.name"]


def test_a_sweep_shows_the_keys_it_varies(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(SWEPT_KEYS_ENV, "data.augment_seed_offset,model.optimizer.lr,norm")
    path = write_hparams(tmp_path, "model.optimizer.lr=0.01")
    hparams, _ = shown_by_tensorboard(path)
    # first: the swept keys (the group norm by its norm.name); a swept key that is no config
    # value makes no column
    assert hparams[:2] == ["model.optimizer.lr", "norm.name"]
    assert not any("augment_seed_offset" in name for name in hparams)


def test_a_swept_key_outside_the_usual_columns_becomes_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(SWEPT_KEYS_ENV, "trainer.gradient_clip_val")
    path = write_hparams(tmp_path, "trainer.gradient_clip_val=0.5")
    hparams, _ = shown_by_tensorboard(path)
    assert "trainer.gradient_clip_val" in hparams
    events = EventAccumulator(str(path))
    events.Reload()
    start = metadata.parse_session_start_info_plugin_data(
        events.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
    )
    assert start.hparams["trainer.gradient_clip_val"].number_value == pytest.approx(0.5)

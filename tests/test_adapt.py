"""Test-time adaptation (``eval.py norm.adapt=test``, AdaBN): only the running statistics
change, and they become the test split's population statistics; ``data.test_shift`` shifts the
test images only; ``norm.adapt`` in training adds ``test_adapted/*`` metrics."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from normlab.errors import ConfigError
from tests.test_configs import compose_train

FAST = ["trainer=cpu", "model.net.widths=[8,16]", "callbacks=none", "logger=csv"]
SHIFT = "data.test_shift={brightness:0.25,contrast:0.6,noise:0.05}"


def _train(tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    from normlab.cli import run_task

    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", *extra]
    _, cfg = compose_train([*FAST, *short], tmp_path / "train")
    metrics = run_task("train", cfg)
    (ckpt,) = (tmp_path / "train").rglob("*.ckpt")
    return metrics, ckpt


def _evaluated_model(tmp_path: Path, monkeypatch, *overrides: str):
    """eval.py in-process; the model it tested."""
    import normlab.run as run
    from normlab.cli import run_task

    seen = {}
    build_trainer = run.build_trainer

    def recording(cfg, *args):
        seen["trainer"] = build_trainer(cfg, *args)
        return seen["trainer"]

    monkeypatch.setattr(run, "build_trainer", recording)
    _, cfg = compose_train(["trainer=cpu", "logger=csv", *overrides], tmp_path / "eval", "eval")
    metrics = run_task("eval", cfg)
    return seen["trainer"].lightning_module, metrics


def test_adapt_test_changes_only_the_running_statistics_to_the_test_population(
    tmp_path: Path, monkeypatch
) -> None:
    _, ckpt = _train(tmp_path)
    model, metrics = _evaluated_model(
        tmp_path, monkeypatch, f"ckpt_path='{ckpt}'", "norm.adapt=test", SHIFT
    )
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    trained, adapted = saved["state_dict"], model.state_dict()
    stats = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 4  # two BatchNorm layers
    for key, value in trained.items():
        if key not in stats:  # weights, gamma/beta, num_batches_tracked: as trained
            assert torch.equal(adapted[key], value), key
    assert all(not torch.allclose(adapted[k], trained[k]) for k in stats)

    # independently: the whole shifted test split as one batch through a copy of the trained
    # model in training mode, its BatchNorm layers averaging cumulatively from zero
    from normlab.data import NormLabDataModule

    shift = {"brightness": 0.25, "contrast": 0.6, "noise": 0.05}
    dm = NormLabDataModule(name="digits", data_dir=str(tmp_path / "data"), test_shift=shift)
    dm.setup("test")
    state = saved["NormLabDataModule"]
    mean, std = torch.as_tensor(state["mean"]), torch.as_tensor(state["std"])
    images = dm.splits["test"].images.float() / 255
    scaled = (images - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    reference = copy.deepcopy(model)
    reference.load_state_dict(trained)
    for layer in reference.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    reference.train()
    with torch.no_grad():
        reference(scaled)
    expected = reference.state_dict()
    for key in stats:
        torch.testing.assert_close(adapted[key], expected[key], rtol=1e-4, atol=1e-5)
    assert 0 <= metrics["test/acc"] <= 1


def test_without_adapt_eval_keeps_the_trained_statistics(tmp_path: Path, monkeypatch) -> None:
    _, ckpt = _train(tmp_path)
    model, _ = _evaluated_model(tmp_path, monkeypatch, f"ckpt_path='{ckpt}'", SHIFT)
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


def test_training_with_adapt_reports_the_adapted_test_metrics(tmp_path: Path) -> None:
    metrics, _ = _train(tmp_path, SHIFT, "norm.adapt=test")
    assert {"test/acc", "test_adapted/acc", "test_adapted/loss"} <= set(metrics)
    assert metrics["test/acc"] != metrics["test_adapted/acc"]


def test_test_shift_changes_the_test_split_only(tmp_path: Path) -> None:
    from normlab.data import NormLabDataModule
    from normlab.data.shift import shift_images

    plain = NormLabDataModule(name="digits", data_dir=str(tmp_path))
    shifted = NormLabDataModule(name="digits", data_dir=str(tmp_path),
                                test_shift={"brightness": 0.2, "contrast": 0.5})  # fmt: skip
    plain.setup("fit")
    shifted.setup("fit")
    for split in ("train", "val"):
        assert torch.equal(plain.splits[split].images, shifted.splits[split].images)
    assert plain.scaler.mean == shifted.scaler.mean
    test = plain.splits["test"].images
    assert torch.equal(shifted.splits["test"].images, shift_images(test, 0.2, 0.5))
    pixel = shift_images(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), 0.2, 0.5)
    assert pixel.flatten().tolist() == [round(0.45 * 255), round(0.95 * 255)]


@pytest.mark.parametrize(
    ("override", "key"),
    [("norm.adapt=train", "norm.adapt"), ("+data.test_shift={blur:1}", "data.test_shift")],
)
def test_bad_adapt_or_shift_is_refused_by_key(override: str, key: str, tmp_path: Path) -> None:
    from normlab.config import validate_train_config

    container, _ = compose_train([override.replace("+data", "data")] if "data" in override
                                 else [override], tmp_path)  # fmt: skip
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_train_config(container)

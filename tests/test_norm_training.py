"""Normalization inside Lightning training: frozen statistics through mode switches, calibration,
precise BN, the freeze schedule, norm weight decay, and end-to-end train.py runs with resumes."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab.errors import CheckpointError, NormConfigError
from normlab.norm import FrozenBatchNorm2d, batchnorm_layers
from tests.conftest import FAST, Run, run_script

STATS = ("running_mean", "running_var", "num_batches_tracked")
AFFINE = ("weight", "bias")


def tiny_data(**kwargs):
    from normlab.data import NormLabDataModule

    synthetic = {"num_samples": 320, "num_test": 64, "shape": [1, 8, 8], "num_classes": 4}
    return NormLabDataModule(
        name="synthetic", synthetic=synthetic, batch_size=32, val_fraction=0.2, **kwargs
    )


def tiny_model(norm: dict, name: str = "adamw", **optimizer):
    from normlab.models import NormLabModule

    opt = {"lr": 0.01, "weight_decay": 1e-4, "norm_weight_decay": 0.0, **optimizer}
    opt["_target_"] = {"adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}[name]
    return NormLabModule(4, 1, norm, net={"widths": [4, 8]}, optimizer=opt, scheduler=None)


def first_batches(datamodule, n: int, epoch: int = 0) -> list[torch.Tensor]:
    """The scaled images of the first ``n`` training batches of ``epoch``, as callbacks see them."""
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)
    out = []
    for images, labels in loader:
        out.append(datamodule.on_after_batch_transfer((images, labels), 0)[0])
        if len(out) == n:
            return out
    return out


def reference_population_stats(
    model: nn.Module, batches: list[torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Population statistics worked out here, independently of ``normlab.norm.stats``: a copy of
    the model whose norm layers are plain ``nn.BatchNorm2d`` (so each normalizes with its batch's
    own statistics, as in training) records every norm layer's input; the mean and unbiased
    variance are then taken over all recorded inputs at once, in float64."""
    net = copy.deepcopy(model).train()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, layer in list(net.named_modules()):
        if isinstance(layer, FrozenBatchNorm2d | nn.BatchNorm2d):
            plain = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=None)
            plain.weight.data.copy_(layer.weight.detach())
            plain.bias.data.copy_(layer.bias.detach())
            plain.register_forward_pre_hook(
                lambda _, args, name=name: inputs.setdefault(name, []).append(args[0].double())
            )
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent), attr, plain)
    with torch.no_grad():
        for batch in batches:
            net(batch)
    stats = {}
    for name, xs in inputs.items():
        x = torch.cat(xs)
        dims = [0, 2, 3]
        stats[name] = (x.mean(dims).float(), x.var(dims, unbiased=True).float())
    return stats


def quiet_trainer(**kwargs):
    import lightning as L

    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


# --- in-process Lightning ------------------------------------------------------------------------


def test_frozen_stats_survive_lightning_mode_switches_and_match_calibration() -> None:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    torch.manual_seed(0)
    # no callback passed: the model brings its NormLifecycle (configure_callbacks)
    datamodule, model = tiny_data(), tiny_model({"name": "frozen", "calibration_batches": 3})
    frozen = dict(batchnorm_layers(model))
    assert set(frozen) == {"net.features.1", "net.features.5"}
    assert all(isinstance(m, FrozenBatchNorm2d) for m in frozen.values())
    # Left in eval mode on purpose: Lightning warns, captures and restores it around validation.
    frozen["net.features.1"].eval()
    datamodule.setup("fit")
    expected = reference_population_stats(model, first_batches(datamodule, 3))

    class Probe(Callback):
        def __init__(self) -> None:
            self.modes: set[tuple[str, str, bool]] = set()
            self.stats_seen: list[dict[str, torch.Tensor]] = []

        def _record(self, pl_module, stage: str) -> None:
            for name, m in batchnorm_layers(pl_module):
                self.modes.add((stage, name, m.training))
            self.stats_seen.append({k: v.clone() for k, v in pl_module.state_dict().items()})

        def on_train_start(self, trainer, pl_module) -> None:
            self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._record(pl_module, "train")

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, idx=0) -> None:
            self._record(pl_module, "val")

    probe = Probe()
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=datamodule)
    assert any(
        issubclass(w.category, PossibleUserWarning) and "1 module(s) in eval mode" in str(w.message)
        for w in caught
    )
    # Lightning switched the modes (validation: eval; training: as the user left them) ...
    assert ("val", "net.features.5", False) in probe.modes
    assert ("train", "net.features.5", True) in probe.modes
    assert ("train", "net.features.1", False) in probe.modes
    assert len(probe.stats_seen) >= 2 * 8 + 2  # 2 epochs of 8 batches, validation, sanity check
    # ... and the statistics are the calibration estimate, unchanged through every step.
    assert set(expected) == set(frozen)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(probe.start[f"{name}.running_mean"], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probe.start[f"{name}.running_var"], var, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(mean, torch.zeros_like(mean))
        assert not torch.allclose(var, torch.ones_like(var))
    end = model.state_dict()
    for name in frozen:
        for stat in STATS:
            key = f"{name}.{stat}"
            assert all(torch.equal(s[key], probe.start[key]) for s in probe.stats_seen), key
            assert torch.equal(end[key], probe.start[key]), key
        assert not torch.equal(end[f"{name}.weight"], probe.start[f"{name}.weight"])
    # The mode never matters: same output in train() and eval().
    x = torch.randn(5, 4, 6, 6)
    layer = frozen["net.features.1"]
    assert torch.equal(layer.train()(x), layer.eval()(x))


def test_norm_weight_decay_param_groups() -> None:
    model = tiny_model({"name": "batchnorm"}, name="sgd", weight_decay=1e-3, norm_weight_decay=0.25)
    optimizer = model.configure_optimizers()
    groups = optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.25]
    norm_params = {id(p) for _, m in batchnorm_layers(model) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == norm_params and len(norm_params) == 4
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for n, p in model.named_parameters() if id(p) not in norm_params
    }
    # conv weights (no bias: BatchNorm's beta replaces it) and the classifier
    assert sum(p.ndim == 4 for p in groups[0]["params"]) == 2

    gn = tiny_model({"name": "groupnorm", "num_groups": 2}, norm_weight_decay=0.5)
    gn_groups = gn.configure_optimizers().param_groups
    gn_params = {id(p) for m in gn.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()}
    assert {id(p) for p in gn_groups[1]["params"]} == gn_params
    assert gn_groups[1]["weight_decay"] == 0.5
    # gamma/beta stored as buffers: nothing for the optimizer, no norm group
    fixed = tiny_model({"name": "frozen", "freeze_affine": True}, norm_weight_decay=0.5)
    assert [g["weight_decay"] for g in fixed.configure_optimizers().param_groups] == [1e-4]


def test_norm_lifecycle_from_config_and_bad_arguments(tmp_path: Path) -> None:
    from normlab.callbacks import NormLifecycle

    default = NormLifecycle.from_config({"name": "batchnorm", "freeze_at_epoch": None})
    assert (default.precise_bn_batches, default.freeze_at_epoch, default.distribute_bn) == (
        0, None, False
    )  # fmt: skip
    made = NormLifecycle.from_config(
        {"name": "batchnorm", "freeze_at_epoch": 3, "precise_bn_batches": 5}
    )
    assert (made.precise_bn_batches, made.freeze_at_epoch) == (5, 3)
    # a config built in Python need not list calibration_batches: the spec's default, 20
    assert NormLifecycle.from_config({"name": "frozen"}).calibration_batches == 20
    calibration = NormLifecycle.from_config({"name": "frozen", "calibration_batches": 7})
    assert calibration.calibration_batches == 7
    for key in ("freeze_at_epoch", "precise_bn_batches", "calibration_batches"):
        value = -1 if key == "precise_bn_batches" else 0
        with pytest.raises(NormConfigError, match=rf"norm\.{key}={value}"):
            NormLifecycle(**{key: value})
    model = tiny_model({"name": "frozen", "calibration_batches": 2})
    (lifecycle, *_) = model.configure_callbacks()
    assert isinstance(lifecycle, NormLifecycle) and lifecycle.calibration_batches == 2
    text = tmp_path / "x.ckpt"
    text.write_text("no")
    model = tiny_model({"name": "frozen", "init_from": str(text)})
    with pytest.raises(CheckpointError, match="norm.init_from="):  # at fit start, before a step
        quiet_trainer(max_epochs=1).fit(model, datamodule=tiny_data())
    assert model.uncalibrated


# --- end to end: train.py as a user runs it ---------------------------------------------------


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def bn_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".running_mean") for k in state if k.endswith(".running_mean"))


def tensorboard_scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def ok(run: Run) -> Run:
    assert run.returncode == 0, run.output[-3000:]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Runs shared by the end-to-end tests below, started lazily: ``runs(name)``."""
    root = tmp_path_factory.mktemp("norm_e2e")
    made: dict[str, Run] = {}
    # A constant learning rate: a cosine schedule sized for the first run's max_epochs would reach
    # lr=0 there and leave nothing to train after a resume. Every epoch's checkpoint is kept:
    # Lightning updates last.ckpt only in epochs that save a top-k checkpoint.
    common = (
        *FAST,
        "model.scheduler=null",
        "callbacks=no_inspection",
        "callbacks.model_checkpoint.save_top_k=-1",
        "test=false",
    )
    recipes = {
        # live BatchNorm with precise BN for one epoch ...
        "bn": ("norm=batchnorm", "norm.precise_bn_batches=2"),
        # ... resumed: epoch 1 live, frozen from epoch 2 on (every epoch's checkpoint kept) ...
        "bn_resumed": (
            "norm=batchnorm",
            "norm.freeze_at_epoch=2",
            "trainer.max_epochs=3",
            "ckpt_path={bn}",
        ),
        # ... and resumed past the freeze epoch for a fourth epoch
        "bn_frozen_resumed": (
            "norm=batchnorm",
            "norm.freeze_at_epoch=2",
            "trainer.max_epochs=4",
            "ckpt_path={bn_resumed}",
        ),
        "frozen": ("norm=frozen",),
        "frozen_resumed": ("norm=frozen", "trainer.max_epochs=2", "ckpt_path={frozen}"),
        "frozen_init": ("norm=frozen", "norm.init_from={bn}"),
    }

    def get(name: str) -> Run:
        if name not in made:
            lasts = {}
            for arg in recipes[name]:
                for dep in recipes:
                    if "{" + dep + "}" in arg:
                        lasts[dep] = get(dep).run_dir / "checkpoints" / "last.ckpt"
            args = [a.format(**lasts) for a in recipes[name]]
            made[name] = ok(run_script("train.py", *common, *args, run_dir=root / name))
        return made[name]

    return get


@pytest.mark.slow
def test_frozen_run_resumed_keeps_exactly_its_statistics(runs) -> None:
    first, resumed = runs("frozen"), runs("frozen_resumed")
    assert "statistics of 2 layers estimated from 20 training batches" in first.output
    assert "resuming, statistics come from" in resumed.output
    assert "estimated from" not in resumed.output  # never re-estimated
    start = load_state(first.run_dir / "checkpoints" / "last.ckpt")
    end = load_state(resumed.run_dir / "checkpoints" / "last.ckpt")
    names = bn_names(start)
    assert names == ["net.features.1", "net.features.5"]
    for name in names:
        mean, var = start[f"{name}.running_mean"], start[f"{name}.running_var"]
        assert mean.abs().max() > 1e-3 and (var - 1).abs().max() > 1e-3  # calibrated, not 0/1
        for stat in STATS:
            assert torch.equal(end[f"{name}.{stat}"], start[f"{name}.{stat}"]), (name, stat)
        for param in AFFINE:
            assert not torch.equal(end[f"{name}.{param}"], start[f"{name}.{param}"]), name
    assert resumed.results["metrics"]["val/acc"] > 0.1  # above chance: digits has 10 classes

    # the frozen checkpoint loads, strictly and bit-exactly, into a norm=batchnorm model
    from normlab.models import NormLabModule

    ckpt = torch.load(resumed.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    frozen_model = NormLabModule(**ckpt["hyper_parameters"])
    bn_model = NormLabModule(**{**ckpt["hyper_parameters"], "norm": {"name": "batchnorm"}})
    frozen_model.load_state_dict(end)
    bn_model.load_state_dict(end)
    assert all(torch.equal(bn_model.state_dict()[k], v) for k, v in end.items())
    assert {type(m).__name__ for _, m in batchnorm_layers(bn_model)} == {"BatchNorm2d"}
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(frozen_model.train()(x), bn_model.eval()(x), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_batchnorm_run_resumed_moves_statistics_until_frozen(runs) -> None:
    start = load_state(runs("bn").run_dir / "checkpoints" / "last.ckpt")
    resumed = runs("bn_resumed")
    ckpts = resumed.run_dir / "checkpoints"
    epoch1, epoch2 = load_state(ckpts / "epoch_001.ckpt"), load_state(ckpts / "epoch_002.ckpt")
    assert (
        "epoch 2: BatchNorm statistics frozen (norm.freeze_at_epoch=2): 2 layers" in resumed.output
    )
    names = bn_names(start)
    assert names == ["net.features.1", "net.features.5"]
    for name in names:
        for stat in ("running_mean", "running_var"):  # live BatchNorm: moving
            assert (epoch1[f"{name}.{stat}"] - start[f"{name}.{stat}"]).abs().max() > 1e-3, name
        steps = epoch1[f"{name}.num_batches_tracked"] - start[f"{name}.num_batches_tracked"]
        assert steps.item() == 20  # one epoch of digits at batch size 64
        for stat in STATS:  # frozen in epoch 2: not a bit changed
            assert torch.equal(epoch2[f"{name}.{stat}"], epoch1[f"{name}.{stat}"]), (name, stat)
        for param in AFFINE:  # while gamma/beta kept training
            assert not torch.equal(epoch2[f"{name}.{param}"], epoch1[f"{name}.{param}"]), name
    assert tensorboard_scalars(resumed.run_dir, "norm/frozen") == [0.0, 1.0]


@pytest.mark.slow
def test_resume_past_freeze_epoch_is_frozen(runs) -> None:
    epoch2 = load_state(runs("bn_resumed").run_dir / "checkpoints" / "epoch_002.ckpt")
    run = runs("bn_frozen_resumed")
    # the checkpoint lists its frozen layers: they are frozen again before its weights load
    assert "2 BatchNorm layers frozen as in the checkpoint" in run.output
    epoch3 = load_state(run.run_dir / "checkpoints" / "last.ckpt")
    for name in bn_names(epoch2):
        for stat in STATS:
            assert torch.equal(epoch3[f"{name}.{stat}"], epoch2[f"{name}.{stat}"]), (name, stat)
        for param in AFFINE:
            assert not torch.equal(epoch3[f"{name}.{param}"], epoch2[f"{name}.{param}"]), name
    assert tensorboard_scalars(run.run_dir, "norm/frozen") == [1.0]


@pytest.mark.slow
def test_precise_bn_sets_population_statistics_and_logs_shift(runs) -> None:
    from hydra.utils import instantiate

    from normlab.models import NormLabModule

    run = runs("bn")
    assert "precise BN (epoch 0, step 20): running statistics of 2 layers recomputed" in run.output
    ckpt = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    model = NormLabModule(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    config = ckpt["normlab"]["config"]
    datamodule = instantiate(config["data"], seed=config["seed"], _convert_="all")
    datamodule.setup("fit")
    stats = reference_population_stats(model, first_batches(datamodule, 2, epoch=0))
    assert len(stats) == 2
    for name, (mean, var) in stats.items():
        torch.testing.assert_close(
            model.get_submodule(name).running_mean, mean, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(model.get_submodule(name).running_var, var, rtol=1e-5, atol=1e-6)

    shifts = tensorboard_scalars(run.run_dir, "norm/precise_bn_max_shift")
    assert len(shifts) == 1 and shifts[0] > 0.01
    assert run.results["metrics"]["norm/precise_bn_max_shift"] == pytest.approx(shifts[0])


@pytest.mark.slow
def test_init_from_batchnorm_checkpoint_into_frozen_run(runs) -> None:
    source = load_state(runs("bn").run_dir / "checkpoints" / "last.ckpt")
    run = runs("frozen_init")
    assert "statistics and weights (" in run.output and "norm.init_from=" in run.output
    assert "estimated from" not in run.output
    end = load_state(run.run_dir / "checkpoints" / "last.ckpt")
    assert list(end) == list(source)  # the same keys in both directions
    for name in bn_names(source):
        for stat in STATS:
            assert torch.equal(end[f"{name}.{stat}"], source[f"{name}.{stat}"]), (name, stat)
        assert not torch.equal(end[f"{name}.weight"], source[f"{name}.weight"])


def test_init_from_not_a_checkpoint_fails_before_training(train_run, tmp_path: Path) -> None:
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint")
    run = train_run("norm=frozen", f"norm.init_from={notes}")
    assert run.returncode == 2
    assert "norm.init_from=" in run.stderr and "is not a normlab checkpoint" in run.stderr
    assert not run.run_dir.exists()  # nothing half-written


def test_precise_bn_uses_the_current_epochs_batches() -> None:
    """Before epoch 1's validation, the first layer's running statistics are the mean and
    (unbiased) variance of its input over the first 2 batches of epoch 1's order, computed here
    from the definition: the sampler's permutation by hand, all values pooled at once."""
    from lightning.pytorch.callbacks import Callback

    torch.manual_seed(0)
    norm = {"name": "batchnorm", "precise_bn_batches": 2}
    datamodule, model = tiny_data(seed=5), tiny_model(norm)

    def expected_stats(pl_module, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        train = datamodule.splits["train"]
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch)
        )
        rows = order[: 2 * datamodule.hparams.batch_size]
        images = datamodule.scaler(train.images[rows])
        with torch.no_grad():
            y = pl_module.net.features[0](images).double()  # the conv feeding net.features.1
        return y.mean((0, 2, 3)), y.transpose(0, 1).reshape(y.shape[1], -1).var(1, unbiased=True)

    class Probe(Callback):
        seen: dict[int, tuple] = {}

        # at the first validation batch: after every on_validation_start, the lifecycle's too
        # (the model's callbacks come after the Trainer's, as in train.py)
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, idx=0) -> None:
            if trainer.sanity_checking or batch_idx:
                return
            layer = pl_module.net.features[1]
            self.seen[trainer.current_epoch] = (
                layer.running_mean.double().clone(),
                layer.running_var.double().clone(),
                expected_stats(pl_module, trainer.current_epoch),
                expected_stats(pl_module, 0),
            )

    probe = Probe()
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe])
    trainer.fit(model, datamodule=datamodule)
    mean, var, (want_mean, want_var), (epoch0_mean, _) = probe.seen[1]
    assert torch.allclose(mean, want_mean, atol=1e-5) and torch.allclose(var, want_var, atol=1e-5)
    assert (epoch0_mean - want_mean).abs().max() > 1e-3  # epoch 0's batches would differ


def test_init_from_folds_conv_biases_of_a_norm_affine_false_run(tmp_path) -> None:
    from normlab.callbacks import NormLifecycle
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
    message = NormLifecycle(init_from=str(path))._load(frozen, frozen_layer_names(frozen))
    assert "conv biases folded into running_mean: ['net.features.0.bias'" in message

    x = torch.randn(16, 1, 8, 8)
    source.eval(), frozen.eval()
    diff = (source(x) - frozen(x)).abs().max().item()
    assert diff <= 1e-5, diff  # without the fold: 0.3 or more

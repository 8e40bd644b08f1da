"""Every option of every config group composes, resolves, validates and instantiates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from normlab.config import register_resolvers, validate_train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GROUPS = [
    "data",
    "augment",
    "model",
    "norm",
    "trainer",
    "logger",
    "callbacks",
    "debug",
    "experiment",
    "hparams_search",
    "extras",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_train(overrides: list[str], tmp_path: Path, config_name: str = "train"):
    os.environ.setdefault("NORMLAB_ROOT", str(ROOT))
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            overrides=[*overrides, f"paths.output_dir={tmp_path}"],
        )
    return OmegaConf.to_container(cfg, resolve=True), cfg


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in GROUPS for o in options(g)],
)
def test_every_option_composes_and_validates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if option == "imagefolder":
        overrides.append(f"data.data_dir={tmp_path}")
    container, _ = compose_train(overrides, tmp_path)
    validate_train_config(container)
    if group in ("norm", "data", "model", "trainer", "experiment"):
        assert container[group if group != "experiment" else "task_name"]


def test_group_options_are_those_of_the_design() -> None:
    # DESIGN.md's command-line contract (ddp / ddp_sim belong to the multi-GPU work)
    assert set(options("norm")) == {
        *("none", "batchnorm", "frozen", "groupnorm", "layernorm", "batchrenorm"),
        *("ghostbatchnorm", "instancenorm", "layernorm2d", "groupnorm1", "gn_ws"),
    }
    assert set(options("data")) == {
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "imagefolder",
        "synthetic",
    }
    assert {"default", "cpu", "gpu", "mps"} <= set(options("trainer"))
    assert set(options("logger")) == {"tensorboard", "csv", "many", "wandb", "mlflow"}
    assert set(options("callbacks")) == {"default", "none", "no_inspection"}
    assert set(options("debug")) == {"default", "fdr", "limit", "overfit", "profiler"}


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_instantiate(logger: str, tmp_path: Path) -> None:
    _, cfg = compose_train([f"logger={logger}"], tmp_path)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    expected = {"tensorboard": 1, "csv": 1, "many": 2, "wandb": 1, "mlflow": 1}[logger]
    assert len(loggers) == expected
    if logger == "wandb":  # offline, into the run dir
        assert loggers[0]._offline and Path(loggers[0].save_dir) == tmp_path
    elif logger == "mlflow":  # a SQLite store beside the runs (tests/test_integrations.py)
        assert loggers[0]._tracking_uri.endswith("/logs/mlflow.db")
    else:
        assert all(Path(lg.log_dir).parent == tmp_path for lg in loggers)


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callbacks_instantiate(callbacks: str, tmp_path: Path) -> None:
    _, cfg = compose_train([f"callbacks={callbacks}"], tmp_path)
    built = [instantiate(c) for c in (cfg.callbacks or {}).values() if c and "_target_" in c]
    names = {type(c).__name__ for c in built}
    essential = {"ModelCheckpoint", "RichProgressBar", "LearningRateMonitor"}
    inspection = {"BatchNormStats", "BatchNormHeatmap", "TrainTestGap", "EvalModeGap"}
    if callbacks == "default":
        assert essential | inspection <= names
    elif callbacks == "no_inspection":
        assert essential <= names and not inspection & names
    else:
        assert built == []


@pytest.mark.parametrize("norm", options("norm"))
def test_model_builds_for_every_norm(norm: str, tmp_path: Path) -> None:
    import torch

    from normlab.norm import batchnorm_layers

    container, cfg = compose_train([f"norm={norm}"], tmp_path)
    model = instantiate(
        cfg.model, norm=container["norm"], num_classes=10, in_channels=1, _convert_="all"
    )
    logits = model(torch.randn(4, 1, 8, 8))
    assert logits.shape == (4, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    # a conv followed by a norm with beta needs no bias of its own
    assert all((c.bias is None) == (norm != "none") for c in convs)
    with_running_statistics = ("batchnorm", "frozen", "batchrenorm", "ghostbatchnorm")
    assert (len(batchnorm_layers(model)) > 0) == (norm in with_running_statistics)
    # hyperparameters are plain data: checkpoints load with weights_only=True
    assert OmegaConf.to_container(OmegaConf.create(dict(model.hparams))) == dict(model.hparams)
    assert all(
        isinstance(v, (int, float, str, list, dict, type(None))) for v in model.hparams.values()
    )


def test_eval_config_requires_ckpt_path(tmp_path: Path) -> None:
    _, cfg = compose_train([], tmp_path, config_name="eval")
    assert OmegaConf.missing_keys(cfg) == {"ckpt_path"}


def test_slurm_launcher_config_follows_the_trainer(tmp_path: Path) -> None:
    os.environ.setdefault("NORMLAB_ROOT", str(ROOT))
    register_resolvers()
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # one SLURM task per GPU, as Lightning's SLURMEnvironment expects
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert cfg.trainer.sync_batchnorm is True
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy")


def test_help_lists_the_users_choices_not_the_structured_configs() -> None:
    # `python train.py --help` prints hydra.help.template, resolved while Hydra is initialized
    os.environ.setdefault("NORMLAB_ROOT", str(ROOT))
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
        text = cfg.hydra.help.template
    assert "\nmodel: cnn, timm, torchvision\n" in text
    assert "normlab_cnn" not in text and "normlab_module" not in text
    assert "hydra/" not in text and "$CONFIG" in text


def test_init_from_is_opened_by_the_config_check(tmp_path: Path) -> None:
    import torch

    from normlab.errors import CheckpointError

    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    gn = tmp_path / "gn.ckpt"
    torch.save({"normlab": {"config": {"norm": {"name": "groupnorm"}}}, "state_dict": {}}, gn)
    for path, message in ((notes, "is not a normlab checkpoint"), (gn, "norm=groupnorm")):
        container, _ = compose_train(["norm=frozen", f"norm.init_from={path}"], tmp_path)
        with pytest.raises(CheckpointError, match=f"norm.init_from={path}.*{message}"):
            validate_train_config(container)

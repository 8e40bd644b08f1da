"""Config plumbing shared by the entry points: resolvers and validation before heavy imports.

Everything here imports neither torch nor Lightning, so `--help` and config errors answer fast.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.errors import ConfigError
from normlab.models.defaults import ACTIVATIONS, MODULE_TARGET
from normlab.norm.spec import BATCH_STATS

DATA_TARGET = "normlab.data.NormLabDataModule"
# the nets built from an architecture name (model=torchvision, model=timm)
NETS_BY_NAME = ("normlab.models.torchvision_net", "normlab.models.timm_net")
SCALINGS = ("dataset", "imagenet", "none", "custom")
# Lightning's trainer.precision values (bf16-mixed: CPUs and Ampere+ GPUs; 16-mixed: GPUs)
PRECISIONS = tuple("32-true bf16-mixed 16-mixed bf16-true 16-true 64-true 32 16 64 bf16".split())
# torch.manual_seed and Lightning's seed_everything take seeds in 0..2**32-1
MAX_SEED = 2**32 - 1
# input channels of each data source (imagefolder images are decoded as RGB)
SOURCE_CHANNELS = {"digits": 1, "mnist": 1, "fashion_mnist": 1, "cifar10": 3, "imagefolder": 3}


def register_resolvers() -> None:
    """Register the OmegaConf resolvers and the structured configs (``normlab_cnn``, ...) that
    configs/ uses (idempotent)."""
    from omegaconf import OmegaConf

    from normlab.models.defaults import register_configs

    register_configs()
    if not OmegaConf.has_resolver("normlab_pid"):
        OmegaConf.register_new_resolver("normlab_pid", lambda: os.getpid(), use_cache=True)
    if not OmegaConf.has_resolver("normlab_config_groups"):
        from normlab.cli import config_groups_help

        OmegaConf.register_new_resolver("normlab_config_groups", config_groups_help)
    if not OmegaConf.has_resolver("normlab_run_name"):
        from normlab.job_names import run_name

        OmegaConf.register_new_resolver("normlab_run_name", run_name)
    if not OmegaConf.has_resolver("normlab_job_name"):
        from normlab.job_names import job_dir_name

        # cached: resolved once per job, before its dir exists
        OmegaConf.register_new_resolver("normlab_job_name", job_dir_name, use_cache=True)
    if not OmegaConf.has_resolver("normlab_deep_net_lr"):
        from normlab.models.defaults import deep_net_lr

        OmegaConf.register_new_resolver("normlab_deep_net_lr", deep_net_lr)
    if not OmegaConf.has_resolver("normlab_linear_lr"):
        # the linear scaling rule (Goyal et al. 2017): lr = base_lr * batch_size / base_batch
        OmegaConf.register_new_resolver("normlab_linear_lr", linear_lr)


def linear_lr(base_lr: float, batch_size: int, base_batch: int = 256) -> float:
    """``${normlab_linear_lr:0.1,${data.batch_size},256}``: the learning rate for ``batch_size``
    that ``base_lr`` is for ``base_batch`` (rounded to 6 significant digits for readable logs)."""
    return float(f"{base_lr * batch_size / base_batch:.6g}")


# the keys that name a file the user has: a leading ~ means their home, as in a shell (quoted on
# Hydra's command line, "~/w.pth", the shell does not expand it)
USER_PATH_KEYS = ("ckpt_path", "model.weights", "norm.init_from")


def expand_user_paths(cfg: Any) -> None:
    """Expand a leading ``~`` in the values of :data:`USER_PATH_KEYS` of the composed config
    ``cfg`` (a DictConfig, changed in place), once, before anything reads them."""
    from omegaconf import OmegaConf

    for key in USER_PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value))


def _number(
    cfg: Mapping[str, Any],
    key: str,
    prefix: str,
    *,
    kind: type = float,
    low=None,
    high=None,
    low_open: bool = False,
    optional: bool = False,
) -> None:
    value = cfg.get(key)
    name = f"{prefix}.{key}"
    if value is None and optional:
        return
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(name, value, f"expected {'an integer' if kind is int else 'a number'}")
    if not math.isfinite(value):  # nan passes every comparison, inf every lower bound
        raise ConfigError(name, value, "expected a finite number (not nan or inf)")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise ConfigError(name, value, f"must be {bound}")
    if high is not None and value > high:
        raise ConfigError(name, value, f"must be at most {high}")


def _choice(value: Any, key: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"choose one of {', '.join(choices)}")


def data_channels(data: Mapping[str, Any]) -> int | None:
    """Number of input channels the configured data source yields (None if unknown)."""
    if data.get("name") == "synthetic":
        shape = (data.get("synthetic") or {}).get("shape") or [3]
        return int(shape[0])
    return SOURCE_CHANNELS.get(data.get("name"))


def _finite_everywhere(value: Any, key: str) -> None:
    """No number anywhere under ``key`` is nan or inf: one rule for every ``data.*`` value (a
    nan passes every range check and an inf every lower bound, so each key's own check misses
    them: ``data.synthetic.noise_std=inf`` trained on pure noise)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _finite_everywhere(v, f"{key}.{k}")
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(key, list(value), "every entry must be a finite number")
        for i, v in enumerate(value):
            _finite_everywhere(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, value, "expected a finite number (not nan or inf)")


def validate_data(data: Mapping[str, Any]) -> None:
    _finite_everywhere(data, "data")
    _number(data, "batch_size", "data", kind=int, low=1)
    _number(data, "eval_batch_size", "data", kind=int, low=1)
    _number(data, "num_workers", "data", kind=int, low=0)
    _streaming(data)
    _number(data, "val_fraction", "data", low=0, high=0.9, low_open=True)
    _number(data, "test_fraction", "data", low=0, high=0.9)
    if data["val_fraction"] + data["test_fraction"] >= 1:
        raise ConfigError(
            "data.val_fraction",
            data["val_fraction"],
            f"with data.test_fraction={data['test_fraction']} it leaves no training split;"
            " keep data.val_fraction + data.test_fraction below 1",
        )
    _number(data, "split_seed", "data", kind=int, low=0, high=MAX_SEED)
    _test_shift(data)
    _image_size(data)
    _choice(data.get("scaling"), "data.scaling", SCALINGS)
    if not isinstance(data.get("download"), bool):
        raise ConfigError("data.download", data.get("download"), "expected true or false")
    if not isinstance(data.get("data_dir"), str) or not data.get("data_dir"):
        raise ConfigError("data.data_dir", data.get("data_dir"), "expected a directory path")
    channels = data_channels(data)
    for key in ("mean", "std"):
        if data.get(key) is not None and data.get("scaling") != "custom":
            raise ConfigError(
                f"data.{key}",
                data.get(key),
                f"it is used only with data.scaling=custom (now data.scaling="
                f"{data.get('scaling')}); add data.scaling=custom, or drop data.{key}",
            )
    if data.get("scaling") == "imagenet" and channels not in (None, 3):
        raise ConfigError(
            "data.scaling",
            "imagenet",
            f"ImageNet constants need RGB data but data={data.get('name')} has {channels}"
            " channel(s); use data.scaling=dataset",
        )
    if data.get("scaling") == "custom":
        for key in ("mean", "std"):
            values = data.get(key)
            if not isinstance(values, Sequence) or isinstance(values, str):
                raise ConfigError(
                    f"data.{key}",
                    values,
                    f"data.scaling=custom needs data.{key} as a list with one number per channel,"
                    f" e.g. data.{key}=[{', '.join(['0.5'] * (channels or 1))}]",
                )
            if channels is not None and len(values) != channels:
                raise ConfigError(
                    f"data.{key}",
                    list(values),
                    f"data={data.get('name')} has {channels} channel(s): give {channels} value(s)",
                )
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
                raise ConfigError(f"data.{key}", list(values), "every entry must be a number")
            if key == "std" and any(v <= 0 for v in values):
                raise ConfigError("data.std", list(values), "every std must be a positive number")


def _image_size(data: Mapping[str, Any]) -> None:
    size = data.get("image_size")
    if size is None:
        return
    if (
        isinstance(size, str)
        or not isinstance(size, Sequence)
        or len(size) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)
    ):
        raise ConfigError("data.image_size", size, "expected [H, W], two positive integers")


def _streaming(data: Mapping[str, Any]) -> None:
    """``data.in_memory``: a bool; false only for image folders, which then need one image size."""
    in_memory = data.get("in_memory", True)
    if not isinstance(in_memory, bool):
        raise ConfigError("data.in_memory", in_memory, "expected true or false")
    if not in_memory and data.get("name") != "imagefolder":
        raise ConfigError(
            "data.in_memory",
            False,
            f"only data=imagefolder streams images from disk; data={data.get('name')} is held in"
            " memory as uint8 (N*C*H*W bytes: 52 MiB for MNIST, 176 MiB for CIFAR-10), so drop"
            " data.in_memory=false",
        )
    if not in_memory and not data.get("image_size"):
        raise ConfigError(
            "data.image_size",
            data.get("image_size"),
            "data.in_memory=false decodes images one by one and stacks them into batches, so they"
            " need one size: set data.image_size=[H,W]",
        )


def _target(cfg: Any, key: str) -> str:
    target = cfg.get("_target_") if isinstance(cfg, Mapping) else None
    if not isinstance(target, str) or not target:
        raise ConfigError(
            f"{key}._target_", target, "expected the dotted name of a class, e.g. pkg.module.Class"
        )
    return target


def validate_convnet(net: Mapping[str, Any]) -> None:
    """The keys of ``model.net`` when it is normlab's ConvNet (``model=cnn``)."""
    widths = net.get("widths")
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ConfigError("model.net.widths", widths, "expected a list of positive integers")
    _number(net, "blocks_per_stage", "model.net", kind=int, low=1)
    _number(net, "dropout", "model.net", low=0, high=0.99)
    _choice(net.get("activation"), "model.net.activation", ACTIVATIONS)


def _net_by_name(net: Mapping[str, Any], arch: Any, convnet: bool) -> None:
    """``model.arch`` belongs to the nets built by name (model=torchvision|timm), and none of
    normlab's nets downloads weights: a download argument would reach the builder offline."""
    by_name = net.get("_target_") in NETS_BY_NAME
    if convnet and arch is not None:
        raise ConfigError(
            "model.arch",
            arch,
            "model=cnn's ConvNet has no architecture name (its shape is model.net.widths and"
            f" model.net.blocks_per_stage); for a named architecture use model=torchvision"
            f" model.arch={arch} (or model=timm), or drop model.arch",
        )
    if by_name and arch is None and net.get("arch") is None:
        raise ConfigError(
            "model.arch",
            None,
            "model=torchvision and model=timm build a net by name: give one, e.g."
            " model.arch=resnet18 (model=timm: model.arch=resnet10t)",
        )
    for key in ("weights", "pretrained"):
        if (convnet or by_name) and net.get(key) not in (None, False):
            raise ConfigError(
                f"model.net.{key}",
                net[key],
                "normlab downloads nothing at run time and builds every net with fresh weights;"
                f" remove model.net.{key} and give a local state_dict file as"
                " model.weights=<file.pth|file.safetensors> (docs/models.md says where torchvision"
                " and timm keep the files they download)",
            )


def validate_model(model: Mapping[str, Any]) -> None:
    """Check the ``model`` config: NormLabModule's own keys when it is the module, the ConvNet's
    keys when it is the net; a user's module or net is checked by its own constructor."""
    from normlab.models.defaults import CONVNET_TARGET

    if _target(model, "model") != MODULE_TARGET:
        return
    net = model.get("net")
    if net is not None:
        _net_by_name(net, model.get("arch"), _target(net, "model.net") == CONVNET_TARGET)
    if net is not None and _target(net, "model.net") == CONVNET_TARGET:
        validate_convnet(net)
    if model.get("activation") is not None:
        _choice(model.get("activation"), "model.activation", ACTIVATIONS)
    arch = model.get("arch")
    if arch is not None and (not isinstance(arch, str) or not arch):
        raise ConfigError("model.arch", arch, "expected an architecture name, e.g. resnet18")
    weights = model.get("weights")
    if weights is not None and (not isinstance(weights, str) or not Path(weights).is_file()):
        raise ConfigError(
            "model.weights",
            weights,
            "no such file; give a local state_dict file (.pth/.safetensors), or null."
            " Nothing is downloaded at run time (see docs/models.md for where to get weights)",
        )
    opt = model.get("optimizer") or {}
    _target(opt, "model.optimizer")
    _number(opt, "lr", "model.optimizer", low=0, low_open=True, high=10)
    _number(opt, "weight_decay", "model.optimizer", low=0, optional=True)
    _number(opt, "norm_weight_decay", "model.optimizer", low=0, optional=True)
    _number(opt, "momentum", "model.optimizer", low=0, high=0.999, optional=True)
    if model.get("scheduler") is not None:
        _target(model["scheduler"], "model.scheduler")
        _number(model["scheduler"], "T_max", "model.scheduler", kind=int, low=1, optional=True)
    for key in ("channels_last", "compile", "weights_strict"):
        if not isinstance(model.get(key, False), bool):
            raise ConfigError(f"model.{key}", model.get(key), "expected true or false")


def validate_trainer(trainer: Mapping[str, Any]) -> None:
    _number(trainer, "max_epochs", "trainer", kind=int, low=1)
    _choice(str(trainer.get("precision") or "32-true"), "trainer.precision", PRECISIONS)
    _number(trainer, "min_epochs", "trainer", kind=int, low=0, optional=True)
    _number(trainer, "log_every_n_steps", "trainer", kind=int, low=1, optional=True)
    _number(trainer, "check_val_every_n_epoch", "trainer", kind=int, low=1, optional=True)
    _number(trainer, "accumulate_grad_batches", "trainer", kind=int, low=1, optional=True)
    _number(trainer, "gradient_clip_val", "trainer", low=0, optional=True)
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str):
        _choice(accelerator, "trainer.accelerator", ACCELERATORS)
    devices = trainer.get("devices")
    if not (
        devices == "auto"
        or (isinstance(devices, (list, tuple)) and len(devices) > 0)
        or (
            isinstance(devices, int)
            and not isinstance(devices, bool)
            and devices >= -1
            and devices != 0
        )
    ):
        raise ConfigError(
            "trainer.devices",
            devices,
            "expected a positive integer, -1, 'auto' or a non-empty list of device ids",
        )


# Lightning's accelerator names ("gpu" picks CUDA or MPS, "auto" whatever this machine has)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
_TRAINER_FIXES = {
    "accelerator": "use trainer.accelerator=auto (whatever this machine has) or trainer=cpu;"
    " gpu/cuda need an NVIDIA GPU with a CUDA build of torch, mps an Apple GPU",
    "devices": "give a positive integer, -1 (all devices), 'auto' or a non-empty list of device"
    " ids that this machine has",
}


def trainer_error(trainer: Mapping[str, Any], err: BaseException) -> ConfigError:
    """Turn an error Lightning raised while building the Trainer into a ConfigError that names
    the ``trainer.*`` key the message is about (``accelerator`` when it names none)."""
    text = " ".join(str(err).split())
    named = [k for k in trainer if re.search(rf"\b{re.escape(str(k))}\b", text)]
    key = "devices" if "devices" in named else named[0] if named else "accelerator"
    fix = _TRAINER_FIXES.get(key, "see the Lightning Trainer documentation of this argument")
    return ConfigError(f"trainer.{key}", trainer.get(key), f"Lightning refuses it ({text}); {fix}")


def validate_ckpt_path(ckpt_path: Any, key: str = "ckpt_path") -> None:
    if ckpt_path in (None, "last"):
        return
    if not isinstance(ckpt_path, str) or not Path(ckpt_path).is_file():
        raise ConfigError(key, ckpt_path, "no such file; give the path of a .ckpt file, or `last`")


def _test_shift(data: Mapping[str, Any]) -> None:
    """``data.test_shift``: null, or a mapping of brightness / contrast / noise."""
    shift = data.get("test_shift")
    if shift is None:
        return
    keys = ("brightness", "contrast", "noise")  # normlab.data.shift.shift_images's arguments
    if not isinstance(shift, Mapping) or set(shift) - set(keys):
        raise ConfigError(
            "data.test_shift", shift, f"expected a mapping of {', '.join(keys)} (or null)"
        )
    if not data.get("in_memory", True):
        raise ConfigError("data.test_shift", dict(shift), "needs data.in_memory=true")
    _number(shift, "brightness", "data.test_shift", low=-1, high=1, optional=True)
    _number(shift, "contrast", "data.test_shift", low=0, optional=True)
    _number(shift, "noise", "data.test_shift", low=0, optional=True)


def _norm_adapt(cfg: Mapping[str, Any]) -> None:
    """``norm.adapt``: null, or ``test`` (re-estimate running statistics on the test data)."""
    adapt = (cfg.get("norm") or {}).get("adapt")
    if adapt not in (None, "test"):
        raise ConfigError(
            "norm.adapt", adapt, "choose test (AdaBN: statistics of the test data) or null"
        )


def validate_eval_config(cfg: Mapping[str, Any]) -> None:
    """Check eval.py's keys (``ckpt_path``, ``data.batch_size``, trainer); raises ConfigError."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last":
        raise ConfigError("ckpt_path", "last", "eval.py needs the path of a .ckpt file")
    if ckpt_path is None:
        raise ConfigError("ckpt_path", None, "eval.py needs the path of a .ckpt file")
    validate_ckpt_path(ckpt_path)
    _seed(cfg.get("seed"))
    data = cfg.get("data") or {}
    if data.get("batch_size") is not None:
        _number(data, "batch_size", "data", kind=int, low=1)
    validate_trainer({**cfg["trainer"], "max_epochs": 1})  # max_epochs is unused by eval
    if data.get("test_shift") is not None:
        _test_shift({"test_shift": data["test_shift"]})


def _seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(
            "seed", seed, f"expected a non-negative integer up to {MAX_SEED} (0 is fine)"
        )


def _train_or_test(cfg: Mapping[str, Any]) -> None:
    """``train``/``test`` must ask for something that can be done with real weights and data."""
    for key in ("train", "test"):
        if not isinstance(cfg.get(key), bool):
            raise ConfigError(key, cfg.get(key), "expected true or false")
    if not cfg["train"] and not cfg["test"]:
        raise ConfigError(
            "train", False, "with test=false there is nothing to do; drop train=false"
        )
    if not cfg["train"] and cfg.get("ckpt_path") is None:
        raise ConfigError(
            "train",
            False,
            "train=false tests the weights of ckpt_path, and ckpt_path is not set (the model would"
            " be the untrained one); add ckpt_path=PATH, or use python eval.py ckpt_path=PATH",
        )
    data = cfg["data"]
    synthetic_test = (data.get("synthetic") or {}).get("num_test", 1)
    no_official_test = data.get("name") == "digits" or (
        data.get("name") == "synthetic" and synthetic_test == 0
    )
    if cfg["test"] and no_official_test and data.get("test_fraction") == 0:
        raise ConfigError(
            "data.test_fraction",
            0,
            f"data={data.get('name')} has no official test split, so data.test_fraction=0 holds"
            " out no test images; set data.test_fraction (e.g. 0.15), or test=false",
        )


def eval_data_config(
    saved: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The data config eval.py tests with: the checkpoint's saved one, with eval.py's non-null
    ``data.*`` keys on top; eval.py's ``data.batch_size`` is the test loader's batch size."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not saved and "_target_" not in given:
        raise ConfigError(
            "data",
            None,
            "the checkpoint holds no data config (it was trained from Python, with DataLoaders"
            " given to fit); name the data set to test on, e.g. python eval.py ckpt_path=<file>"
            " +data=digits (an option of configs/data/)",
        )
    if "batch_size" in given:
        given["eval_batch_size"] = given.pop("batch_size")
    return {**(saved or {}), **given}


def validate_train_config(cfg: Mapping[str, Any]) -> None:
    """Check types and ranges of the user-facing keys; raises ConfigError naming the key."""
    _seed(cfg.get("seed"))
    _train_or_test(cfg)
    if cfg["data"].get("_target_") == DATA_TARGET:  # a user's DataModule checks its own config
        validate_data(cfg["data"])
    validate_model(cfg["model"])
    validate_trainer(cfg["trainer"])
    if (
        cfg["norm"].get("name") in BATCH_STATS
        and cfg["data"].get("batch_size") == 1
        and cfg.get("train")
    ):
        raise ConfigError(
            "data.batch_size",
            1,
            "BatchNorm in training mode normalizes each channel with the batch's statistics, and a"
            " batch of one sample gives it the statistics of a single image (and PyTorch refuses"
            " a channel with one value, as on a 1x1 feature map); use data.batch_size>=2 (16 or"
            " more for stable statistics), or norm=frozen/groupnorm/layernorm for one-sample"
            " batches",
        )
    validate_ckpt_path(cfg.get("ckpt_path"))
    _norm_adapt(cfg)
    from normlab.models.defaults import CONVNET_TARGET
    from normlab.norm.schema import validate_norm_config

    # the ConvNet's normalized channels are known now; other models are checked at conversion
    net = cfg["model"].get("net") or {}
    convnet = (
        cfg["model"].get("_target_") == MODULE_TARGET and net.get("_target_") == CONVNET_TARGET
    )
    channels = list(net["widths"]) if convnet else []
    validate_norm_config(cfg["norm"], channels=channels, max_epochs=cfg["trainer"]["max_epochs"])
    if cfg["norm"].get("init_from") is not None:  # a checkpoint holding BatchNorm statistics
        from normlab.callbacks.norm_lifecycle import init_from_state_dict

        init_from_state_dict(cfg["norm"]["init_from"])

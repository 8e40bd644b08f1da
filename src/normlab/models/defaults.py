"""The model's defaults, written once: the structured configs behind ``configs/model/*.yaml``
(registered with Hydra's ConfigStore) and the defaults of ``NormLabModule``'s Python API, so the
CLI and a Python user build the same model with the same optimizer. Imports no torch.

Fields are typed ``Any`` on purpose: normlab checks values itself (``normlab.config``) and
answers with one ``normlab: error:`` paragraph naming the key, rather than OmegaConf's error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

CONVNET_TARGET = "normlab.models.ConvNet"
MODULE_TARGET = "normlab.models.NormLabModule"
# the activations the ConvNet builds (model.activation, model.net.activation)
ACTIVATIONS = ("relu", "sigmoid", "tanh", "gelu", "silu", "leaky_relu")


@dataclass
class ConvNetConfig:
    """``model.net`` of ``model=cnn``: ``normlab.models.ConvNet``'s architecture."""

    _target_: str = CONVNET_TARGET
    # output channels of each stage (3x3 convs, 2x2 max-pooling between stages)
    widths: Any = field(default_factory=lambda: [32, 64, 128])
    # conv -> norm -> activation blocks per stage
    blocks_per_stage: Any = 1
    # relu | sigmoid | tanh | gelu | silu | leaky_relu
    activation: Any = "relu"
    # dropout before the classifier
    dropout: Any = 0.0


@dataclass
class OptimizerConfig:
    """``model.optimizer``: a partial optimizer, given the parameter groups by NormLabModule."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: Any = 0.003
    weight_decay: Any = 0.0001
    # weight decay of norm parameters (gamma/beta), in their own parameter group "norm";
    # consumed by NormLabModule, not passed to the optimizer
    norm_weight_decay: Any = 0.0


@dataclass
class SchedulerConfig:
    """``model.scheduler``: a partial epoch-wise LR scheduler (null: constant LR)."""

    _target_: str = "torch.optim.lr_scheduler.CosineAnnealingLR"
    _partial_: bool = True
    # null: trainer.max_epochs (the cosine reaches its minimum at the end of training)
    T_max: Any = None


@dataclass
class ModelConfig:
    """``model``: ``normlab.models.NormLabModule``, which wraps any ``net``."""

    _target_: str = "normlab.models.NormLabModule"
    # net, optimizer and scheduler reach NormLabModule as configs (its plain-data
    # hyperparameters), also for a plain hydra.utils.instantiate(cfg.model, ...)
    _recursive_: bool = False
    net: Any = None
    # the architecture name of a net built by name (model=torchvision / model=timm)
    arch: Any = None
    # the net's activation, e.g. sigmoid (model=cnn: replaces model.net.activation; model=timm:
    # its act_layer); null keeps the net's own
    activation: Any = None
    # a local state_dict file (.pth/.pt/.safetensors) loaded before the norm conversion
    weights: Any = None
    # false: load the tensors of model.weights that fit and re-initialise the rest (true: refuse
    # a file that leaves the model's body partly fresh or holds tensors the model does not use)
    weights_strict: Any = True
    # plain dicts, not typed nodes: an experiment's YAML may swap the _target_ and add its own
    # arguments (SGD's momentum, a warm-up's epochs), as `+model.optimizer.momentum=` does
    optimizer: Any = field(default_factory=lambda: asdict(OptimizerConfig()))
    scheduler: Any = field(default_factory=lambda: asdict(SchedulerConfig()))
    # channels-last (NHWC) memory for convolutions, the layout GPU tensor cores prefer
    channels_last: Any = False
    # torch.compile the net (the first steps are slower while it compiles)
    compile: Any = False


# AdamW learning rates that train the deep nets built by name (model=torchvision|timm, 8x8 digits
# to 32x32 CIFAR) with each norm in a few epochs; the ConvNet's 3e-3 (OptimizerConfig.lr) leaves
# a ResNet-18 with GroupNorm at chance. Measured on digits with the commands in docs/models.md
# ("Learning-rate defaults"); tests/test_docs_learn.py runs every documented command with them.
DEEP_NET_LR = {"default": 1e-3, "groupnorm": 3e-4}


def deep_net_lr(norm: str | None) -> float:
    """``${normlab_deep_net_lr:${norm.name}}``: the default lr of model=torchvision|timm."""
    return DEEP_NET_LR.get(norm or "default", DEEP_NET_LR["default"])


def default(name: str) -> dict[str, Any]:
    """A fresh plain-dict copy of a default: ``"net"`` (the ConvNet), ``"optimizer"``,
    ``"scheduler"``."""
    return asdict({"net": ConvNetConfig, "optimizer": OptimizerConfig}.get(name, SchedulerConfig)())


# the model group's structured configs that model YAML files start from (`defaults: [normlab_cnn]`);
# not a choice of their own, so `--help` leaves them out
INTERNAL_MODEL_CONFIGS = ("normlab_module", "normlab_cnn")


def register_configs() -> None:
    """Store the structured configs that ``configs/model/*.yaml`` start from (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    module, cnn = INTERNAL_MODEL_CONFIGS
    cs.store(group="model", name=module, node=ModelConfig)
    cs.store(group="model", name=cnn, node=ModelConfig(net=ConvNetConfig()))

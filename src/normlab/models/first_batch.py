"""One batch through the model before anything runs: a net that cannot read the data's images,
that answers with another number of outputs than the data has classes, or labels outside the
classes would otherwise stop training with a library's traceback (or, on a GPU, a device-side
assert), after the run dir, logger and trainer were set up."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from normlab.errors import ConfigError

SAMPLES = 2  # enough to show the shapes; small enough to cost nothing on any architecture


def _net_name(model: L.LightningModule) -> str:
    net = (getattr(model, "hparams", {}) or {}).get("net") or {}
    return str(net.get("_target_", type(model).__name__))


def _data_name(datamodule: Any) -> str:
    return f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"


def check_num_classes(datamodule: Any) -> None:
    """Refuse, before the model is built for it, data of fewer than two classes.

    Raises:
        ConfigError: names the data class and its ``num_classes``.
    """
    if datamodule.num_classes < 2:
        raise ConfigError(
            "data._target_",
            _data_name(datamodule),
            f"it reports num_classes={datamodule.num_classes}; a classifier needs at least two"
            " classes",
        )


def check_first_batch(model: L.LightningModule, datamodule: Any, train: bool = True) -> None:
    """Run the first batch of the split the run starts with (training, else test) through
    ``model`` in eval mode without gradients, and refuse labels outside
    ``0..datamodule.num_classes-1``, a forward that fails, or outputs that are not one logit per
    class. The model's state is unchanged (no statistics update in eval mode).

    Raises:
        ConfigError: names the data or the net, the shapes, and the fix.
    """
    num_classes, data = datamodule.num_classes, _data_name(datamodule)
    datamodule.setup("fit" if train else "test")
    loader = datamodule.train_dataloader() if train else datamodule.test_dataloader()
    with torch.random.fork_rng(devices=[]):  # a shuffling loader draws its seed: training's stays
        images, labels = datamodule.on_after_batch_transfer(next(iter(loader)), 0)
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        found = f"{labels.dtype} labels"
    elif labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        found = f"labels from {int(labels.min())} to {int(labels.max())}"
    else:
        found = ""
    if found:
        raise ConfigError(
            "data._target_",
            data,
            f"its first batch holds {found}, but it reports num_classes={num_classes}: a"
            f" classifier needs integer labels 0..{num_classes - 1}; make num_classes the number"
            " of classes and map the labels onto 0..num_classes-1",
        )
    images = images[:SAMPLES]
    was_training = model.training
    # the bare net when there is one: a compiled wrapper would compile for this batch's shape
    net = model.net if isinstance(getattr(model, "net", None), torch.nn.Module) else model
    model.eval()
    try:
        with torch.no_grad():
            logits = net(images)
    except Exception as err:  # noqa: BLE001 - the library's message is the substance
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
        raise ConfigError(
            "model.net._target_",
            _net_name(model),
            f"the net cannot read this data's images (shape {list(images.shape[1:])}): {reason}."
            f" Fix: data whose images fit the net, or a net for these images{_size_hint(model)}",
        ) from None
    finally:
        model.train(was_training)
    expected = [images.shape[0], num_classes]
    if list(getattr(logits, "shape", [])) != expected:
        got = list(logits.shape) if hasattr(logits, "shape") else type(logits).__name__
        raise ConfigError(
            "model.net._target_",
            _net_name(model),
            f"for {images.shape[0]} images it returns outputs of shape {got}, but the loss needs"
            f" {expected}: one logit per class of the data (num_classes={num_classes}). Make the"
            " net's last layer output num_classes (normlab passes num_classes to a constructor"
            " that takes it)",
        )


def _size_hint(model: L.LightningModule) -> str:
    """torchvision's VisionTransformer is built for one image size and takes another."""
    size = getattr(getattr(model, "net", None), "image_size", None)
    if isinstance(size, int):
        return (
            f" (it was built for {size}x{size} images: a torchvision ViT takes"
            " +model.net.image_size=<the data's image size>, a multiple of its patch size)"
        )
    return ""

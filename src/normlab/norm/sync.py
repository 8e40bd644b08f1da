"""SyncBatchNorm for DDP that keeps what the model computes: a Lightning ``LayerSync`` plugin."""

from __future__ import annotations

from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from normlab.norm.convert import _BATCHNORMS, _plain_name
from normlab.norm.layers import replace_modules
from normlab.norm.variants import keep_children


class SyncBatchNormKeepingActivations(TorchSyncBatchNorm):
    """Lightning's ``sync_batchnorm``, without its two silent changes to the network: every live
    BatchNorm (``nn.BatchNorm1d/2d/3d``, timm's ``BatchNormAct2d``, normlab's
    ``BatchNorm2dAct``) becomes a ``torch.nn.SyncBatchNorm`` that still applies the activation
    (and dropout) fused into it, and nothing else changes: ``FrozenBatchNorm2d`` layers stay
    frozen, norms that only look like BatchNorm (a subclass computing something else) stay as
    they are. ``revert`` gives back the very modules ``apply`` replaced.

    Lightning's own plugin (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) turns a
    ``BatchNormAct2d`` into a plain ``SyncBatchNorm`` whose forward never calls ``act``:
    timm's efficientnet_b0 then computes another function. train.py uses this plugin for
    ``trainer.sync_batchnorm=true`` (``trainer=ddp``).

    The parameters and buffers are the replaced layers' own tensors (an optimizer keeps them).
    SyncBatchNorm synchronizes in training mode only, and torch runs it on GPUs only.

    Example::

        trainer = L.Trainer(strategy="ddp", devices=4, sync_batchnorm=True,
                            plugins=[SyncBatchNormKeepingActivations()])
    """

    def __init__(self) -> None:
        self._originals: dict[nn.Module, nn.Module] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        def swap(name: str, m: nn.Module) -> nn.Module | None:
            if _plain_name(m) not in _BATCHNORMS or isinstance(m, nn.SyncBatchNorm):
                return None
            sync = nn.SyncBatchNorm(
                m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats
            )
            _share_tensors(m, sync)
            sync.training = m.training
            sync = keep_children(m, sync)
            self._originals[sync] = m
            return sync

        return replace_modules(model, swap)

    def revert(self, model: nn.Module) -> nn.Module:
        def swap(name: str, m: nn.Module) -> nn.Module | None:
            original = self._originals.pop(m, None)
            if original is None:
                return None
            _share_tensors(m, original)  # .to(device) gave the sync layer new buffers
            original.training = m.training
            return original

        return replace_modules(model, swap)


def _share_tensors(source: nn.Module, target: nn.Module) -> None:
    """Make ``target``'s own parameters and buffers the very tensors of ``source``."""
    for key, value in source._parameters.items():
        target._parameters[key] = value
    for key, value in source._buffers.items():
        target._buffers[key] = value

"""trainer.sync_batchnorm through normlab's LayerSync: the structure it builds on CPU (fused
activations kept, frozen layers frozen, revert gives the model back), the Trainer wiring, and
the statistics a SyncBatchNorm computes over 2 gloo processes against one process's BatchNorm.

torch's SyncBatchNorm runs on GPUs only (its CPU forward in training raises), so the 2-process
check gathers each process's per-channel count, mean and mean of squares with ``all_gather``
(what SyncBatchNorm's CUDA kernels exchange), combines them as SyncBatchNorm does and writes the
running statistics of the converted layer with its own momentum; the reference is a plain
BatchNorm2d fed the concatenated global batch, in float64. scripts/gpu_check.sh runs the real
SyncBatchNorm on a GPU against the same kind of reference.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from normlab.norm import FrozenBatchNorm2d, freeze_named_layers
from normlab.norm.sync import SyncBatchNormKeepingActivations

timm = pytest.importorskip("timm")


def test_efficientnet_b0_keeps_its_silu_and_its_function() -> None:
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3).eval()
    freeze_named_layers(model, ["bn2"])  # a frozen layer stays frozen
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    originals = dict(model.named_modules())
    plugin = SyncBatchNormKeepingActivations()
    synced = plugin.apply(model)
    layers = dict(synced.named_modules())
    sync = [n for n, m in layers.items() if isinstance(m, nn.SyncBatchNorm)]
    assert len(sync) == 48 and "bn1" in sync and "bn2" not in sync
    assert isinstance(layers["bn1.act"], nn.SiLU) and isinstance(layers["bn2"], FrozenBatchNorm2d)
    assert layers["bn1"].weight is originals["bn1"].weight  # the optimizer's parameters
    with torch.no_grad():
        assert (synced(x) - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()
    reverted = plugin.revert(synced)
    assert all(dict(reverted.named_modules())[n] is originals[n] for n in sync)
    # Lightning's own plugin loses the activation: the same network computes something else
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    lightning_synced = TorchSyncBatchNorm().apply(reverted)
    with torch.no_grad():
        assert (lightning_synced(x) - expected).abs().max().item() > 1e-2


def test_trainer_sync_batchnorm_uses_it(tmp_path: Path) -> None:
    from normlab.run import build_trainer
    from tests.test_configs import compose_train

    _, cfg = compose_train(["trainer=cpu", "trainer.sync_batchnorm=true"], tmp_path)
    trainer = build_trainer(cfg)
    layer_sync = trainer._accelerator_connector._layer_sync
    assert isinstance(layer_sync, SyncBatchNormKeepingActivations)


MOMENTUM, B = 0.3, 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=MOMENTUM), nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0, 0.3)
    return model.double()


def _batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1


def synced_batchnorm(layer: nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """SyncBatchNorm's training forward on CPU: statistics over every process's batch."""
    dims = [0, *range(2, x.dim())]
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
    local = torch.cat([count, x.mean(dims), (x * x).mean(dims)])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    stats = torch.stack(gathered)
    counts, c = stats[:, :1], x.shape[1]
    total = counts.sum()
    mean = (stats[:, 1 : 1 + c] * counts).sum(0) / total
    var = (stats[:, 1 + c :] * counts).sum(0) / total - mean**2
    with torch.no_grad():
        m = layer.momentum
        layer.running_mean.mul_(1 - m).add_(m * mean)
        layer.running_var.mul_(1 - m).add_(m * var * total / (total - 1))
        layer.num_batches_tracked += 1
    shape = (1, -1, 1, 1)
    y = (x - mean.view(shape)) * (var + layer.eps).rsqrt().view(shape)
    y = y * layer.weight.view(shape) + layer.bias.view(shape)
    for child in layer.children():
        y = child(y)
    return y


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    fused = SyncBatchNormKeepingActivations().apply(_with_fused_relu())
    layer = fused[1]
    assert isinstance(layer, nn.SyncBatchNorm) and isinstance(layer.act, nn.ReLU)
    with torch.no_grad():
        y = synced_batchnorm(layer, fused[0](_batch()[rank * B : (rank + 1) * B]))
    if rank == 0:
        torch.save({"y": y, **layer.state_dict()}, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see tests/test_ddp.py: gloo threads can abort interpreter teardown


def _with_fused_relu() -> nn.Module:
    """conv -> BatchNorm2d with its ReLU fused as a child (normlab's BatchNorm2dAct)."""
    from normlab.norm import keep_children

    model = _model()
    bn_act = nn.Module()
    bn_act.act = model[2]
    model[1] = keep_children(bn_act, model[1])
    return model[:2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_compute_the_global_batch_statistics(tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    synced = torch.load(out, weights_only=True)
    reference = _model().train()
    with torch.no_grad():
        y = reference(_batch())  # one process, the whole batch
    bn = reference[1]
    assert synced["num_batches_tracked"].item() == 1
    for key in ("running_mean", "running_var"):
        assert (synced[key] - getattr(bn, key)).abs().max().item() <= 1e-12
    assert (synced["y"] - y[:B]).abs().max().item() <= 1e-12  # rank 0's share, normalized

"""Several processes (DDP) under Hydra: one run dir per job, and BatchNorm's batch made explicit.

Lightning's DDP launcher starts ranks 1..N-1 by re-running ``sys.argv`` with
``hydra.run.dir=<HydraConfig.run.dir>``. Under ``-m`` (multirun) that would re-run the whole
sweep in a second sweep dir, and the children would log into the single-run dir pattern.
``prepare_child_processes`` rewrites both so that every child joins exactly its job's run.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from normlab.errors import ConfigError
from normlab.norm.spec import BATCH_STATS

log = logging.getLogger("normlab")

# below this many samples per process, unsynced BatchNorm statistics get noisy
SMALL_PER_DEVICE_BATCH = 16


def prepare_child_processes() -> None:
    """Make DDP children of a Hydra job run that job, once, in its own output dir.

    Call in the launching process (rank 0) before ``trainer.fit``; harmless without DDP.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    if not HydraConfig.initialized() or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # the child gets this job's overrides only (no -m, no sweep lists)
        flags = [a for a in sys.argv[1:] if a.startswith("-") and a not in ("-m", "--multirun")]
        sys.argv = [sys.argv[0], *flags, *hydra_cfg.overrides.task]
    # Lightning passes HydraConfig.run.dir to the children: point it at this job's dir
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


@contextmanager
def job_scope() -> Iterator[None]:
    """Run one Hydra job so that the next job of the same process starts clean.

    Lightning's DDP launcher leaves ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``... in the
    launching process's environment and the process group initialized; the next job of a sweep
    would then take itself for an externally launched rank and talk to the previous job's
    (finished) children. Restores the environment and ``sys.argv`` and destroys the group.
    """
    environ, argv = dict(os.environ), list(sys.argv)
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
        sys.argv[:] = argv


def world_size(trainer_cfg: Mapping[str, Any]) -> int | None:
    """Processes the trainer config asks for, when it can be told without torch (else None)."""
    devices, nodes = trainer_cfg.get("devices"), trainer_cfg.get("num_nodes") or 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    return None


def check_batchnorm_setup(cfg: Mapping[str, Any], accelerator: str) -> None:
    """SyncBatchNorm only where torch can run it; a warning where BatchNorm sees small batches.

    Args:
        cfg: the composed run config (plain mapping).
        accelerator: the accelerator the Trainer actually chose ("cpu", "cuda", "mps", ...).

    Raises:
        ConfigError: ``trainer.sync_batchnorm=true`` on CPU, where torch's SyncBatchNorm raises.
    """
    trainer, norm, data = cfg["trainer"], cfg["norm"], cfg["data"]
    live_bn = norm.get("name") in BATCH_STATS
    if trainer.get("sync_batchnorm") and live_bn and norm["name"] != "batchnorm":
        raise ConfigError(
            "trainer.sync_batchnorm",
            True,
            f"norm={norm['name']} normalizes with each process's own batch statistics, and"
            " SyncBatchNorm would replace its layers by plain BatchNorm. Set"
            " trainer.sync_batchnorm=false (docs/normalization.md says what each process"
            " computes), or use norm=batchnorm to sync statistics across GPUs",
        )
    if trainer.get("sync_batchnorm") and accelerator == "cpu":
        raise ConfigError(
            "trainer.sync_batchnorm",
            True,
            "torch's SyncBatchNorm runs only on GPUs, and this run is on the CPU. Set"
            " trainer.sync_batchnorm=false (each process then normalizes with its own"
            " data.batch_size samples; norm.distribute_bn=true averages the running statistics"
            " over processes), or run on GPUs with trainer=ddp",
        )
    size = world_size(trainer) or 1
    if size > 1:
        batch = data.get("batch_size")
        log.info(
            "DDP: %d processes x data.batch_size=%s = global batch %s per step (the learning"
            " rate is not rescaled: set model.optimizer.lr for the global batch)",
            size,
            batch,
            size * batch if isinstance(batch, int) else "?",
        )
        if live_bn and not trainer.get("sync_batchnorm") and batch < SMALL_PER_DEVICE_BATCH:
            log.warning(
                "BatchNorm normalizes each process's %d samples on its own (trainer."
                "sync_batchnorm=false): with so few, batch statistics are noisy and differ from"
                " the running ones. Use a larger data.batch_size, or trainer.sync_batchnorm=true"
                " on GPUs.",
                batch,
            )

"""Random number generator state in checkpoints, so a resumed run draws the same dropout masks."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("normlab")


def collect_rng_state() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and python RNG states as tensors and plain numbers,
    so a checkpoint holding them still loads with ``torch.load(weights_only=True)``."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(py_state), "gauss": gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`collect_rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("torch.cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


class RNGStateCheckpoint(Callback):
    """Saves the global random state (torch, CUDA, numpy, python) in every checkpoint and restores
    it when training resumes from one.

    Lightning restores weights, optimizer, schedulers and loop counters, but not the random state:
    without this callback a run resumed from ``last.ckpt`` draws other dropout masks (and other
    random augmentations) than the uninterrupted run. Together with the data order being a function
    of ``(seed, epoch)`` (``EpochSeededSampler``), resuming at an epoch boundary gives the same
    weights as never stopping. Under DDP every rank seeds the same way (``seed_everything``), so
    rank 0's state is saved and every rank restores it.

    Logs nothing; adds ``checkpoint["callbacks"]["RNGStateCheckpoint"]``. Takes no arguments and
    raises nothing of its own.

    Example::

        trainer = Trainer(callbacks=[RNGStateCheckpoint()])
        trainer.fit(model, ckpt_path="logs/train/runs/<run>/checkpoints/last.ckpt")
    """

    def state_dict(self) -> dict[str, Any]:
        # called by Trainer.save_checkpoint: the state at the moment of saving
        return {"rng": collect_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # called while restoring the checkpoint in Trainer.fit(ckpt_path=...), before the first
        # training batch (the sanity check runs in isolate_rng and does not consume it)
        if "rng" in state_dict:
            restore_rng_state(state_dict["rng"])
            log.debug("restored the random state saved in the checkpoint")

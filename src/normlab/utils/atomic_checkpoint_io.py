"""Checkpoints written atomically beside their target, so a kill or a full disk leaves the
previous good file (see :mod:`normlab.utils.atomic_file`)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from normlab.utils.atomic_file import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: ``torch.save`` into a hidden temp file
    in the checkpoint's own directory, flush, fsync, ``os.replace`` onto the target, fsync the
    directory.

    Lightning's own save (``_atomic_save``) buffers the checkpoint in memory and commits it through
    an fsspec transaction, whose temp file lives in ``$TMPDIR``; when ``$TMPDIR`` is on another
    filesystem than the run dir (node-local scratch, a tmpfs), the commit is a copy into the
    target, and a kill during it leaves a truncated ``last.ckpt`` in place of the good one.
    Remote paths (``s3://`` ...) keep Lightning's behaviour.

    Raises:
        normlab.utils.atomic_file.WriteError: the file could not be written (no space left,
            read-only); the previous checkpoint stays and the temp file is removed.

    Example::

        trainer = Trainer(plugins=[AtomicCheckpointIO()])
        trainer.fit(model)  # every checkpoint is either the old file or the complete new one
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        protocol = get_filesystem(path).protocol  # "file" or ("file", "local") for local paths
        local = "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
        if storage_options is not None or not local:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda f: torch.save(checkpoint, f), what="checkpoint")

"""Write a file so that a reader, a kill or a full disk never leaves half of it in place.

The new content goes to a hidden temp file *beside* the target (same directory, so the same
filesystem: never ``$TMPDIR``, from where a "move" would be a copy into the target), is flushed and
fsynced, and then renamed over the target with ``os.replace``, which is atomic on POSIX; the
directory is fsynced so the rename itself survives a crash. Until the rename the previous file is
untouched; a failed write removes its temp file.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

from normlab.errors import NormlabError

TEMP_SUFFIX = ".partial"


class WriteError(NormlabError, OSError):
    """A result file could not be written (full disk, no permission); the previous one is kept."""


def temp_prefix(target: Path) -> str:
    """Prefix of the temp files written for ``target``: ``.<name>.``, hidden, in its directory."""
    return f".{target.name}."


class _RecordingFile:
    """A binary file whose ``write`` remembers the OSError it raised: torch.save's C++ writer
    swallows it and raises a RuntimeError that does not say the disk is full."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and platforms) refuse fsync on a directory
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], what: str = "file") -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then move it into place atomically.

    Args:
        path: the target file; its directory is created if needed.
        write: writes the whole content to the binary file object it is given.
        what: what the file is, for the error message (``checkpoint``, ``results``).

    Raises:
        WriteError: an OSError while writing (no space left, read-only, permission); the message
            names the file and says the previous one, if any, is kept.
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        name = f"{temp_prefix(target)}{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        tmp = target.parent / name
        # os.open, not mkstemp: the file gets the usual umask permissions, not mkstemp's 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingFile(f)
            try:
                write(recorder)
            except Exception as err:  # torch.save reports a failed write as "unexpected pos"
                raise (recorder.error or err) from err
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(target.parent)
    except OSError as err:
        kept = "the previous one is kept" if target.is_file() else "no earlier one existed"
        fix = (
            "free space on that filesystem or point paths.log_dir (or hydra.run.dir) at a disk"
            " with room"
            if err.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check that the directory is writable, or point paths.log_dir elsewhere"
        )
        raise WriteError(
            f"could not write the {what} {target} ({err.strerror or err}); {kept}. Fix: {fix}."
        ) from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    _remove_stale_temps(target)
    return target


def _remove_stale_temps(target: Path) -> None:
    """Temp files a killed writer left beside ``target``: this process just wrote ``target``, so
    no other writer of it is running (only rank 0 writes checkpoints and results)."""
    for stale in target.parent.glob(f"{temp_prefix(target)}*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)

"""A run dir belongs to one run: a lock while it runs, and no second run over a finished one.

Two ``train.py ... hydra.run.dir=X`` started together both wrote X (one run's results.json and
last.ckpt, the other's checkpoint, one interleaved log); started one after the other, the second
replaced the first's checkpoints and results. :func:`claim_run_dir` answers before Hydra writes
anything into X (called from ``normlab.preflight.Preflight.on_run_start``):

- another live process holds ``X/.lock`` (``fcntl.flock``, released by the OS when its holder
  exits, so a killed run leaves no stale lock): refused, naming its pid;
- X holds a finished run (``results.json`` or ``checkpoints/``): refused, unless this command
  resumes from a checkpoint inside X (``ckpt_path=X/checkpoints/last.ckpt``, or ``last``).

DDP ranks > 0 re-run the entry point into their rank 0's dir; they join its run and claim
nothing. Imports neither torch nor Lightning.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from normlab.errors import NormlabError

LOCK_NAME = ".lock"
# what a run leaves that a second run would overwrite
FINISHED_MARKS = ("results.json", "checkpoints")
# the launchers' rank variables (Lightning's DDP children, torchrun, SLURM tasks)
RANK_VARIABLES = ("LOCAL_RANK", "RANK", "SLURM_PROCID")

_held: dict[str, tuple[int, bool]] = {}  # absolute run dir -> (lock fd, created by this run)


class RunDirError(NormlabError):
    """The run dir is in use by another run, or holds a finished run this command would
    overwrite."""


def is_rank_zero_process() -> bool:
    """False in a process a launcher started as rank > 0 of a run (it joins rank 0's dir)."""
    return all(os.environ.get(v, "0") == "0" for v in RANK_VARIABLES)


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _try_lock(lock: Path, create: bool) -> int | None:
    """An fd holding ``lock`` exclusively; None when there is no such file and not ``create``.

    Raises:
        BlockingIOError: another process holds it.
    """
    try:
        fd = os.open(lock, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _resumes_inside(run_dir: Path, ckpt_path: object, where: str) -> bool:
    if ckpt_path == "last":  # cli.check_checkpoint_arg checks the one it picks
        return any(run_dir.glob(f"{where}checkpoints/last.ckpt"))
    if not isinstance(ckpt_path, str):
        return False
    path = Path(os.path.abspath(os.path.expanduser(ckpt_path)))
    return run_dir in path.parents


def claim_run_dir(
    run_dir: str | Path,
    ckpt_path: object = None,
    key: str = "hydra.run.dir",
    resume: bool = True,
    sweep: bool = False,
) -> None:
    """Make ``run_dir`` this run's (creating it), or refuse before writing anything into it.

    Args:
        run_dir: the run's output dir.
        ckpt_path: the command's ``ckpt_path``; a checkpoint inside ``run_dir`` (or ``last``
            with ``run_dir/checkpoints/last.ckpt``) resumes the run there, which is allowed.
        key: the config key that named ``run_dir``, for the message.
        resume: False for a command that never resumes (eval.py): a finished run is refused.
        sweep: ``run_dir`` is a multirun's sweep dir: its jobs' dirs are one level down.

    Raises:
        RunDirError: another live process holds the dir, or it holds a finished run.
    """
    if not is_rank_zero_process():
        return
    path = Path(os.path.abspath(run_dir))
    if str(path) in _held:
        return
    lock = path / LOCK_NAME
    created = not path.exists()
    fd = None
    try:
        if not created:
            fd = _try_lock(lock, create=False)  # a live holder answers first
            where = "*/" if sweep else ""
            found = [where + m for m in FINISHED_MARKS if any(path.glob(where + m))]
            if found and not (resume and _resumes_inside(path, ckpt_path, where)):
                raise RunDirError(_finished_message(key, path, found, resume))
        path.mkdir(parents=True, exist_ok=True)
        fd = fd if fd is not None else _try_lock(lock, create=True)
    except BlockingIOError:
        raise RunDirError(
            f"{key}={path} is in use by another run (pid {_holder(lock)}, holding {lock}): two"
            " runs in one dir overwrite each other's checkpoints, results and log. Fix: wait for"
            f" that run to finish, or give this one another dir (drop {key} for a new"
            " timestamped one)."
        ) from None
    except RunDirError:
        if fd is not None:
            os.close(fd)
        raise
    assert fd is not None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[str(path)] = (fd, created)


def _finished_message(key: str, path: Path, found: list[str], resume: bool) -> str:
    last = path / "checkpoints" / "last.ckpt"
    resume_hint = f", or resume that run there with ckpt_path={last}" if resume else ""
    return (
        f"{key}={path} already holds a finished run ({', '.join(found)}), which this run would"
        f" overwrite. Fix: give this run another dir (drop {key} for a new timestamped"
        f" one){resume_hint}."
    )


def check_resumes_here(run_dir: str | Path, ckpt_path: object, key: str = "hydra.run.dir") -> None:
    """Once ``ckpt_path=last`` is resolved: a claimed dir that held a finished run is resumed
    only from a checkpoint inside it (``last`` may pick a newer run's elsewhere).

    Raises:
        RunDirError: the finished run there would be overwritten by another run's resume.
    """
    path = Path(os.path.abspath(run_dir))
    held = _held.get(str(path))
    found = [m for m in FINISHED_MARKS if (path / m).exists()]
    if held is not None and not held[1] and found and not _resumes_inside(path, ckpt_path, ""):
        raise RunDirError(_finished_message(key, path, found, resume=True))


def created_by_this_run(run_dir: str | Path) -> bool | None:
    """True when this process claimed ``run_dir`` and created it, False when it claimed a dir
    that existed before, None when it claimed nothing (a Python caller without Hydra)."""
    held = _held.get(os.path.abspath(run_dir))
    return None if held is None else held[1]


def release_run_dir(run_dir: str | Path) -> None:
    """Give up the claim on ``run_dir`` (the lock is also released when the process exits)."""
    held = _held.pop(os.path.abspath(run_dir), None)
    if held is not None:
        os.close(held[0])

"""Checkpoints and results.json are written atomically beside their target: a kill or a full disk
at any moment leaves the previous good file, and nothing is left in ``$TMPDIR``.

The slow tests kill or starve a real train.py with ``$TMPDIR`` on another filesystem (a tmpfs),
where Lightning's own save (a temp file in ``$TMPDIR``, then a move that is a copy) left a
truncated ``last.ckpt`` behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from normlab.utils.atomic_file import TEMP_SUFFIX, WriteError, atomic_write
from tests.conftest import FAST, ROOT, run_script

# a wide model: its checkpoint (weights and AdamW moments) takes long enough to write that a
# kill lands inside the write; one training and one validation batch keep each epoch short
WIDE = [
    "model.net.widths=[512,512]",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "data.eval_batch_size=64",
    "callbacks=no_inspection",
    "test=false",
]


def _files(directory: Path) -> list[str]:
    """The files under ``directory`` (torch may leave an empty cache dir in $TMPDIR)."""
    return [str(p) for p in directory.rglob("*") if p.is_file()]


def _loads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def _other_fs_dir(than: Path) -> Iterator[Path]:
    """A fresh directory on a filesystem other than ``than``'s (/dev/shm), else skip."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(than).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's tmp dir")
    where = Path(tempfile.mkdtemp(dir=shm, prefix="normlab-tmpdir-"))
    yield where
    for p in sorted(where.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    where.rmdir()


@pytest.fixture
def foreign_tmpdir(tmp_path: Path) -> Iterator[Path]:
    yield from _other_fs_dir(tmp_path)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted at tmp_path/disk (root only), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_atomic_write_keeps_previous_file_on_full_disk(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_write(target, lambda f: f.write(b"good"))

    def fill_disk(f) -> None:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match="No space left on device") as info:
        atomic_write(target, fill_disk, what="checkpoint")
    assert str(target) in str(info.value) and "the previous one is kept" in str(info.value)
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # temp removed


def test_atomic_write_replaces_and_cleans_stale_temps(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    stale = tmp_path / f".results.json.123.abcd{TEMP_SUFFIX}"  # a killed writer's leftover
    stale.write_bytes(b"{")
    atomic_write(target, lambda f: f.write(b"{}"))
    assert target.read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_atomic_write_order_is_write_fsync_replace_fsync_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durable-write order: the temp file is written, flushed and fsynced, then renamed over
    the target, then the directory is fsynced (so the rename survives a crash). Dropping a fsync
    or renaming before the data is on disk fails here, though every file still looks right."""
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    calls: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        calls.append(("fsync", path.name if path != tmp_path else "<dir>", path.stat().st_size))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def write(f) -> None:
        calls.append(("write",))
        f.write(b"new content")

    atomic_write(target, write)
    kinds = [c[0] for c in calls]
    assert kinds == ["write", "fsync", "replace", "fsync"], calls
    temp_name = calls[2][1]
    assert temp_name.startswith(".last.ckpt.") and temp_name.endswith(TEMP_SUFFIX)
    # the file fsynced is the temp file, holding all of the new content (11 bytes), not the target
    assert calls[1] == ("fsync", temp_name, len(b"new content"))
    assert calls[2][2] == "last.ckpt"
    assert calls[3][1] == "<dir>"  # the directory holding the target
    assert target.read_bytes() == b"new content"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoint_io_writes_beside_target_not_in_tmpdir(
    tmp_path: Path, foreign_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from normlab.utils.atomic_checkpoint_io import AtomicCheckpointIO

    monkeypatch.setenv("TMPDIR", str(foreign_tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    seen: list[str] = []
    real_replace = os.replace

    def spy(src, dst) -> None:
        seen.append(str(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3.0)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3.0))
    assert [Path(s).parent for s in seen] == [path.parent]
    assert _files(foreign_tmpdir) == []


def _killed_while_saving(run_dir: Path, log_dir: Path, tmpdir: Path) -> tuple[str, int]:
    """Start train.py and SIGKILL it while it rewrites last.ckpt (a temp file for last.ckpt in
    the run dir, or any file in $TMPDIR, is in the middle of being written)."""
    cmd = [sys.executable, str(ROOT / "train.py"), *FAST, *WIDE, "trainer.max_epochs=4"]
    cmd += [f"hydra.run.dir={run_dir}", f"paths.log_dir={log_dir}"]
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=None)
    ckpts, seen = run_dir / "checkpoints", ""
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline and not seen:
            if (ckpts / "last.ckpt").is_file():  # a good last.ckpt exists: catch its rewrite
                writing = [p.name for p in ckpts.glob(".last.ckpt.*")]
                seen = (writing or _files(tmpdir) or [""])[0]
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        returncode = proc.wait()
    return seen, returncode


@pytest.mark.slow
def test_kill_while_saving_keeps_loadable_checkpoints(tmp_path: Path, foreign_tmpdir: Path) -> None:
    log_dir = tmp_path / "logs"
    run_dir = log_dir / "train" / "runs" / "killed"
    seen, returncode = _killed_while_saving(run_dir, log_dir, foreign_tmpdir)
    assert seen.startswith(".last.ckpt.") and seen.endswith(TEMP_SUFFIX), seen
    assert returncode == -signal.SIGKILL
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in [p.name for p in ckpts]
    assert [p.name for p in ckpts if not _loads(p)] == []
    assert _files(foreign_tmpdir) == []  # nothing orphaned in $TMPDIR

    # the requeue recipe: resume from the newest last.ckpt of the task
    resumed = run_script(
        "train.py", *FAST, *WIDE, "trainer.max_epochs=4", "ckpt_path=last",
        run_dir=tmp_path / "resumed", env={"TMPDIR": str(foreign_tmpdir)},
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.results["epochs"] == 4
    assert _files(foreign_tmpdir) == []


@pytest.mark.slow
def test_full_disk_keeps_previous_checkpoints(small_disk: Path, foreign_tmpdir: Path) -> None:
    # each checkpoint of widths [256, 256] is about 7 MB: two fit on the 16 MiB disk, a third
    # (epoch 1's best or the rewrite of last.ckpt) does not
    run = run_script(
        "train.py", *FAST, *WIDE, "model.net.widths=[256,256]", "trainer.max_epochs=3",
        "logger=csv", run_dir=small_disk / "run", env={"TMPDIR": str(foreign_tmpdir)},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("normlab: error: ")]
    assert len(errors) == 1 and "Traceback" not in run.output, run.stderr[-3000:]
    assert "No space left on device" in errors[0]
    assert str(small_disk / "run" / "checkpoints") in errors[0]
    assert "the previous one is kept" in errors[0] or "no earlier one existed" in errors[0]
    ckpts = sorted((small_disk / "run" / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in ckpts if p.name == "last.ckpt"] == ["last.ckpt"]
    assert [p.name for p in ckpts if not _loads(p)] == []
    assert list((small_disk / "run").rglob(f"*{TEMP_SUFFIX}")) == []
    assert not (small_disk / "run" / "results.json").exists()
    assert _files(foreign_tmpdir) == []


@pytest.mark.parametrize(
    "plugins, checkpoint_io, environment",
    [
        (None, "AtomicCheckpointIO", "LightningEnvironment"),
        # a user's plugins are kept, and checkpoints are still written atomically
        (
            "[{_target_: lightning.fabric.plugins.environments.TorchElasticEnvironment}]",
            "AtomicCheckpointIO",
            "TorchElasticEnvironment",
        ),
        # a user's own checkpoint I/O (one plugin, not a list) replaces normlab's
        ("{_target_: lightning.fabric.plugins.TorchCheckpointIO}", "TorchCheckpointIO", None),
    ],
)
def test_a_users_trainer_plugins_join_the_atomic_checkpoint_io(
    plugins: str | None, checkpoint_io: str, environment: str | None, tmp_path: Path
) -> None:
    from normlab.run import build_trainer
    from tests.test_configs import compose_train

    extra = [f"+trainer.plugins={plugins}"] if plugins else []
    _, cfg = compose_train(["trainer=cpu", "logger=csv", *extra], tmp_path)
    trainer = build_trainer(cfg, [])
    assert type(trainer.strategy.checkpoint_io).__name__ == checkpoint_io
    if environment:
        cluster = trainer._accelerator_connector.cluster_environment
        assert type(cluster).__name__ == environment

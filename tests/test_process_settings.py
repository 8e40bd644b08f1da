"""The process-wide settings train.py and eval.py make (normlab/utils/process.py): glibc's
allocator keeps freed memory, a user's own allocator settings win, and the final collection is
skipped only when asked."""

from __future__ import annotations

import gc
import platform

import pytest

from normlab.utils import process


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_gets_the_allocator_settings(monkeypatch) -> None:
    for key in [k for k in process.os.environ if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    assert process.keep_freed_memory() is True  # the real libc took them
    calls = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(process.ctypes, "CDLL", lambda name: Libc())
    assert process.keep_freed_memory() is True
    # M_MMAP_THRESHOLD (-3) fixed at 32 MiB, M_TRIM_THRESHOLD (-1) at 1 GiB
    assert calls == [(-3, 32 * 1024 * 1024), (-1, 1024 * 1024 * 1024)]


@pytest.mark.parametrize(
    "env", [("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"), ("MALLOC_TRIM_THRESHOLD_", "0")]
)
def test_a_users_allocator_settings_are_kept(monkeypatch, env) -> None:
    called = []
    monkeypatch.setattr(process.ctypes, "CDLL", lambda *a: called.append(a))
    monkeypatch.setenv(*env)
    assert process.keep_freed_memory() is False
    assert called == []  # libc was not even opened


def test_skip_collection_at_exit_freezes_what_is_left() -> None:
    assert gc.get_freeze_count() == 0
    try:
        process.skip_collection_at_exit()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()

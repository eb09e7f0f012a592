"""Disks in trouble, made safely: a small tmpfs or a loop-mounted ext4 image on a temp dir
of our own, filled up, remounted read-only or made immutable; always unmounted, detached
and removed afterwards, also when the test fails.  Needs root (mount, losetup, chattr).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PREFIX = "wi-ops-disk-"


def need_root_tools(*tools: str) -> None:
    """Skip without root or the tools, except under CI, where that is a failure."""
    missing = [t for t in tools if shutil.which(t) is None]
    why = None
    if os.geteuid() != 0:
        why = "needs root to mount test filesystems"
    elif missing:
        why = f"needs {', '.join(missing)} (apt-get install e2fsprogs util-linux mount)"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def _mountpoint() -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        yield mnt
    finally:
        if os.path.ismount(mnt):
            with contextlib.suppress(subprocess.SubprocessError):
                _run("umount", str(mnt))
            if os.path.ismount(mnt):  # something still holds a file: detach it anyway
                _run("umount", "-l", str(mnt))
        mnt.rmdir()


@contextlib.contextmanager
def tmpfs(size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on a fresh temp dir."""
    need_root_tools("mount", "umount")
    with _mountpoint() as mnt:
        _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "wi-ops-tmpfs", str(mnt))
        yield mnt


@contextlib.contextmanager
def ext4(size_mb: int = 8) -> Iterator[Path]:
    """A small ext4 image on a loop device, mounted on a fresh temp dir (for chattr)."""
    need_root_tools("mount", "umount", "losetup", "mkfs.ext4", "chattr")
    image = Path(tempfile.mkstemp(prefix=PREFIX, suffix=".img")[1])
    dev = ""
    try:
        os.truncate(image, size_mb << 20)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()
        with _mountpoint() as mnt:
            _run("mount", dev, str(mnt))
            try:
                yield mnt
            finally:
                # immutable files would survive as junk in the image; harmless, but tidy
                subprocess.run(["chattr", "-R", "-i", str(mnt)], capture_output=True,
                               timeout=60)
    finally:
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)
        image.unlink(missing_ok=True)


def fill(fs: Path) -> None:
    """Write a file until the filesystem is full (ENOSPC), down to the last block."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = 1 << 20
        while size >= 512:
            try:
                os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                size //= 2
    finally:
        os.close(fd)


def free_up(fs: Path) -> None:
    (fs / "filler").unlink()


def remount(fs: Path, mode: str) -> None:
    """``mode`` is "ro" or "rw"."""
    _run("mount", "-o", f"remount,{mode}", str(fs))


def chattr(flag: str, path: Path) -> None:
    """``flag`` is "+i" or "-i"."""
    _run("chattr", flag, str(path))

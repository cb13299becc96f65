"""Sparse-aware file copies: only data extents are copied, holes are never written."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["copy_data_extents", "data_extents", "sparse_copy"]

_STEP = 8 << 20


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Data extents ``(offset, length)`` of *fd* within ``[start, end)`` (SEEK_DATA/HOLE)."""
    end = min(end, os.fstat(fd).st_size)
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def _copy(src: int, src_off: int, dst: int, dst_off: int, n: int) -> None:
    while n > 0:
        step = min(n, _STEP)
        try:
            done = os.copy_file_range(src, dst, step, src_off, dst_off)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            done = 0
        if done <= 0:  # fall back to a plain read/write
            data = os.pread(src, step, src_off)
            if not data:
                return
            done = os.pwrite(dst, data, dst_off)
        src_off, dst_off, n = src_off + done, dst_off + done, n - done


def copy_data_extents(src: int, src_off: int, dst: int, dst_off: int, n: int) -> None:
    """Copy ``src[src_off:src_off+n]`` to ``dst[dst_off:]``, data extents only."""
    for off, length in data_extents(src, src_off, src_off + n):
        _copy(src, off, dst, dst_off + (off - src_off), length)


def sparse_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """``cp --sparse=always``-like copy keeping the holes of *src* (apparent size equal)."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            size = os.fstat(sfd).st_size
            copy_data_extents(sfd, 0, dfd, 0, size)
            os.ftruncate(dfd, size)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return Path(dst)

"""Shared-memory arenas: where decode workers put a shard's pixel buffers for the GPU process.

Sending a 7.4 MB image back through the process pool's result pipe costs a pickle, two copies
and the pipe's bandwidth, all of it serialised on the one thread that reads results in the
process that owns the GPU: a few hundred images a second at most. Instead, the owner creates
one shared-memory block per shard in flight (:class:`Arena`), gives every selected file a slot
sized from its header (Rows x Columns x Bits Allocated, known from the header scan), and the
worker writes the stored values (or the compressed frame) straight into its slot; only a small
record travels back. With CUDA the block is page-locked once (``cudaHostRegister``), so the
host-to-device copies read it directly, asynchronously, with no staging copy: the arena *is*
the pinned staging buffer, and two of them alternate (the shard being decoded and the shard
being scored).

A file whose buffer turns out larger than its slot, or that found no room, travels inline.
Workers attach to an arena by name and keep at most a few attachments; the owner unlinks the
block when it is closed (and Python's resource tracker does if the owner dies).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable
from multiprocessing import shared_memory

import numpy as np

ALIGN = 4096
"""Slots start on page boundaries (whole pages per image; DMA-friendly)."""


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Arena:
    """One shared-memory block, created by the process that owns it (``pin`` with CUDA)."""

    def __init__(self, nbytes: int, *, pin: bool = False) -> None:
        self.size = aligned(max(nbytes, ALIGN))
        _check_room(self.size)
        self._shm = shared_memory.SharedMemory(create=True, size=self.size)
        self.name = self._shm.name
        self.array = np.ndarray((self.size,), dtype=np.uint8, buffer=self._shm.buf)
        self.pinned = False
        if pin:
            self.pinned = _host_register(self.array)

    def view(self, offset: int, shape: Iterable[int], dtype: np.dtype | str) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = tuple(shape)
        n = int(np.prod(shape)) * dtype.itemsize
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"slot {offset}+{n} is outside the arena of {self.size} bytes")
        return np.ndarray(shape, dtype=dtype, buffer=self._shm.buf, offset=offset)

    def close(self) -> None:
        if self._shm is None:
            return
        if self.pinned:
            _host_unregister(self.array)
            self.pinned = False
        self.array = None  # type: ignore[assignment]  # release the exported buffer first
        with contextlib.suppress(BufferError):
            self._shm.close()
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()
        self._shm = None  # type: ignore[assignment]

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SHM = "/dev/shm"


def _check_room(size: int) -> None:
    """``OSError`` unless the shared-memory file system has room for ``size`` bytes. (Creating
    a larger block succeeds, sparse; a worker writing past the room then dies of SIGBUS.)"""
    if not os.path.isdir(SHM):
        return  # not Linux's tmpfs: nothing to check
    free = shutil.disk_usage(SHM).free
    if free < size:
        raise OSError(
            f"{SHM} has {free / 2**30:.1f} GiB free, an arena of {size / 2**30:.1f} GiB does "
            "not fit (a container's --shm-size, say)"
        )


def plan(sizes: Iterable[int | None], capacity: int) -> list[tuple[int, int] | None]:
    """(offset, capacity) per buffer of ``sizes`` bytes, in order, within ``capacity`` bytes;
    None for an unknown size or one that no longer fits (it travels inline)."""
    slots: list[tuple[int, int] | None] = []
    offset = 0
    for n in sizes:
        if not n or n <= 0 or offset + aligned(n) > capacity:
            slots.append(None)
            continue
        slots.append((offset, n))
        offset += aligned(n)
    return slots


# -- worker side ------------------------------------------------------------------------------

_ATTACHED: OrderedDict[str, _Attached] = OrderedDict()
_KEEP = 4


class _Attached:
    def __init__(self, name: str) -> None:
        # Attaching registers the name with the resource tracker again; spawned workers share
        # their parent's tracker, whose record of the name is a set entry: the owner's unlink
        # clears it, and if the owner dies the tracker unlinks the block.
        self._shm = shared_memory.SharedMemory(name=name)
        self.size = self._shm.size

    def view(self, offset: int, shape: Iterable[int], dtype: np.dtype | str) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = tuple(shape)
        n = int(np.prod(shape)) * dtype.itemsize
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"slot {offset}+{n} is outside the arena of {self.size} bytes")
        return np.ndarray(shape, dtype=dtype, buffer=self._shm.buf, offset=offset)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._shm.close()


def attach(name: str) -> _Attached:
    """This process's attachment to the arena ``name`` (kept for the next files)."""
    found = _ATTACHED.get(name)
    if found is not None:
        _ATTACHED.move_to_end(name)
        return found
    found = _ATTACHED[name] = _Attached(name)
    while len(_ATTACHED) > _KEEP:
        _, old = _ATTACHED.popitem(last=False)
        old.close()
    return found


# -- page-locking with CUDA ---------------------------------------------------------------------


def _host_register(array: np.ndarray) -> bool:
    """Page-lock ``array`` for asynchronous copies (False when CUDA refuses or is absent)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        cudart = torch.cuda.cudart()
        status = cudart.cudaHostRegister(array.ctypes.data, array.nbytes, 0)
        return int(status) == 0
    except Exception:  # pinning is an optimisation: without it copies are synchronous
        return False


def _host_unregister(array: np.ndarray) -> None:
    with contextlib.suppress(Exception):
        import torch

        torch.cuda.cudart().cudaHostUnregister(array.ctypes.data)

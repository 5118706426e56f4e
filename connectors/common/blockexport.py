"""NBD semantics over a block API's fixed-size blocks (see blockapi.py).

Standard library only: this module runs inside nbdkit's embedded Python
(``nbdkit_blockapi_plugin.py``) as well as in the worker's tests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

HOLE_ZERO = 3  # nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
CACHE_BLOCKS = 64


class BlockBackend(Protocol):
    """One disk as the platform's block API sees it."""

    size: int  # bytes the export serves
    block_size: int  # the API's block

    def allocated(self) -> set[int]:
        """Indices of the blocks that hold data (others read as zeros)."""
        ...

    def read_block(self, index: int) -> bytes:
        """The block's ``block_size`` bytes (called only for allocated blocks)."""
        ...

    def write_block(self, index: int, data: bytes) -> None:
        """Store one whole block durably (the call returns when the platform has it)."""
        ...

    def flush(self) -> None:
        """Make what the backend keeps locally about the writes durable."""
        ...


class BlockExport:
    """NBD semantics over a ``BlockBackend``: byte ranges to whole blocks."""

    def __init__(self, backend: BlockBackend, *, cache_blocks: int = CACHE_BLOCKS,
                 workers: int = 16) -> None:
        self.backend = backend
        self.bs = backend.block_size
        self.size = backend.size
        self._allocated = set(backend.allocated())
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_blocks = cache_blocks
        self._lock = threading.Lock()
        self._block_locks = [threading.Lock() for _ in range(256)]  # read-modify-write
        self._fetch_locks = [threading.Lock() for _ in range(256)]  # one fetch per block
        self._pool: ThreadPoolExecutor | None = None
        self._workers = workers

    # ------------------------------------------------------------------ blocks

    def _cached(self, index: int) -> bytes | None:
        with self._lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
            return data

    def _remember(self, index: int, data: bytes) -> None:
        with self._lock:
            self._cache[index] = data
            self._cache.move_to_end(index)
            while len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)

    def block(self, index: int) -> bytes:
        """The current content of one block."""
        data = self._cached(index)
        if data is not None:
            return data
        with self._lock:
            holds_data = index in self._allocated
        if not holds_data:
            return bytes(self.bs)
        # Requests smaller than a block arrive together on several connections: one
        # fetch per block, the others wait for it and read the cache.
        with self._fetch_locks[index % len(self._fetch_locks)]:
            data = self._cached(index)
            if data is not None:
                return data
            data = self.backend.read_block(index)
            if len(data) != self.bs:
                raise OSError(f"block {index} came back with {len(data)} bytes, not {self.bs}")
            self._remember(index, data)
            return data

    def _store(self, index: int, data: bytes) -> None:
        self.backend.write_block(index, data)
        with self._lock:
            self._allocated.add(index)
        self._remember(index, data)

    def _span(self, offset: int, length: int) -> Iterable[tuple[int, int, int]]:
        """(block index, offset within the block, length) covering the range."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(f"range {offset}+{length} is outside the {self.size}-byte disk")
        end = offset + length
        while offset < end:
            index, within = divmod(offset, self.bs)
            n = min(self.bs - within, end - offset)
            yield index, within, n
            offset += n

    # ------------------------------------------------------------------ NBD

    def _each(self, fn: Callable[[tuple[int, int, int, int]], None],
              parts: list[tuple[int, int, int, int]]) -> None:
        """``fn`` over a request's blocks, concurrently: a 4 MiB request is eight API calls,
        and one slow (throttled, retried) call must not hold the others back."""
        if len(parts) == 1 or self._workers <= 1:
            for part in parts:
                fn(part)
            return
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="block")
        for _ in self._pool.map(fn, parts):
            pass

    def _parts(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(block index, offset within the block, length, offset within the request)."""
        out, pos = [], 0
        for index, within, n in self._span(offset, length):
            out.append((index, within, n, pos))
            pos += n
        return out

    def pread(self, buf: memoryview, offset: int) -> None:
        def read(part: tuple[int, int, int, int]) -> None:
            index, within, n, pos = part
            buf[pos:pos + n] = self.block(index)[within:within + n]
        self._each(read, self._parts(offset, len(buf)))

    def pwrite(self, buf: memoryview, offset: int) -> None:
        def write(part: tuple[int, int, int, int]) -> None:
            index, within, n, pos = part
            self._write_part(index, within, bytes(buf[pos:pos + n]))
        self._each(write, self._parts(offset, len(buf)))

    def _write_part(self, index: int, within: int, data: bytes) -> None:
        if within == 0 and len(data) == self.bs:
            self._store(index, data)
            return
        # The tail block of a disk whose size is not a whole number of blocks is
        # padded with zeros: the API stores whole blocks only.
        with self._block_locks[index % len(self._block_locks)]:
            block = bytearray(self.block(index))
            block[within:within + len(data)] = data
            self._store(index, bytes(block))

    def zero(self, count: int, offset: int) -> None:
        for index, within, n in self._span(offset, count):
            with self._lock:
                holds_data = index in self._allocated
            if not holds_data:
                continue
            self._write_part(index, within, bytes(n))

    def flush(self) -> None:
        self.backend.flush()

    def extents(self, count: int, offset: int) -> list[tuple[int, int, int]]:
        """Block status: allocated blocks are data, the others holes that read as zeros."""
        out: list[tuple[int, int, int]] = []
        for index, within, n in self._span(offset, count):
            with self._lock:
                kind = 0 if index in self._allocated else HOLE_ZERO
            start = index * self.bs + within
            if out and out[-1][2] == kind:
                o, ln, k = out[-1]
                out[-1] = (o, ln + n, k)
            else:
                out.append((start, n, kind))
        return out

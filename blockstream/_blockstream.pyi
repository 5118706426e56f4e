"""Type stub of the private C engine (see blockstream/src/module.c)."""

from collections.abc import Sequence
from typing import Any

HASH_SIZE: int

class Stream:
    def __init__(
        self,
        source: str,
        destination: str | None,
        extents: object,
        disk_size: int,
        block_size: int = ...,
        hash: str = ...,
        compare: bool = ...,
        max_request: int = ...,
        connections: int = ...,
        in_flight: int = ...,
        rate_limit: int | None = ...,
        allow_trim: bool = ...,
        start_offset: int = ...,
        flush_interval: int = ...,
        flush_seconds: float = ...,
        manifest: Any = ...,
        connect_timeout: float = ...,
        request_timeout: float = ...,
        max_unflushed: int | None = ...,
    ) -> None: ...
    def run(self) -> tuple[Any, ...]: ...
    def cancel(self) -> None: ...
    def set_rate_limit(self, rate: int | None, /) -> None: ...
    def progress(self) -> tuple[Any, ...]: ...

class BlockstreamError(Exception):
    extent: tuple[int, int] | None
    nbd_error: str
    errno: int
    endpoint: str | None
    def __init__(
        self,
        message: str,
        *,
        extent: tuple[int, int] | None = ...,
        nbd_error: str = ...,
        errno: int = ...,
        endpoint: str | None = ...,
    ) -> None: ...

class Cancelled(BlockstreamError): ...

def normalize(
    extents: Sequence[tuple[int, int] | tuple[int, int, bool]],
    disk_size: int,
    block_size: int,
    start_offset: int = ...,
) -> list[tuple[int, int, bool]]: ...
def hash_blocks(data: bytes, block_size: int, hash: str = ...) -> bytes: ...
def zero_manifest(disk_size: int, block_size: int = ..., hash: str = ...) -> bytearray: ...
def zstd_compress(data: bytes | bytearray | memoryview, level: int = ..., /) -> bytes: ...
def zstd_decompress(data: bytes, size: int, /) -> bytearray: ...
def xxh64(data: bytes, seed: int = ..., /) -> int: ...
def block_status(uri: str, context: str, limit: int = ..., /) -> tuple[list[tuple[int, int, int]], int]: ...

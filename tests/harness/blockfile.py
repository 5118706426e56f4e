"""A block backend over a plain file, for testing connectors/common/blockapi.py.

Loaded inside nbdkit's embedded Python like a cloud connector's backend: whole blocks
only, every call recorded in a log file (``r INDEX`` / ``w INDEX``) so tests count the
API calls a copy made. A block holds data when the file has data there (SEEK_DATA).
"""

from __future__ import annotations

import os
import threading
from typing import Any


class FileBlocks:
    def __init__(self, params: dict[str, Any]) -> None:
        self.path = str(params["path"])
        self.size = int(params["size"])
        self.block_size = int(params.get("block_size", 524288))
        self.log_path = str(params["log"])
        self.fd = os.open(self.path, os.O_RDWR)
        self._lock = threading.Lock()

    def allocated(self) -> set[int]:
        out: set[int] = set()
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            out.update(range(start // self.block_size, (end - 1) // self.block_size + 1))
            pos = end
        return {i for i in out if i * self.block_size < self.size}

    def _log(self, line: str) -> None:
        with self._lock, open(self.log_path, "a") as f:
            f.write(line + "\n")

    def read_block(self, index: int) -> bytes:
        self._log(f"r {index}")
        data = os.pread(self.fd, self.block_size, index * self.block_size)
        return data + bytes(self.block_size - len(data))

    def write_block(self, index: int, data: bytes) -> None:
        assert len(data) == self.block_size, len(data)
        self._log(f"w {index}")
        os.pwrite(self.fd, data[: max(0, min(self.block_size, self.size - index * self.block_size))],
                  index * self.block_size)

    def flush(self) -> None:
        os.fsync(self.fd)

"""connectors/common/blockapi.py: a block API served as NBD through nbdkit's Python plugin.

A file-backed backend (tests/harness/blockfile.py) stands in for a cloud's block API;
the checks are on bytes and on the backend calls the copies made."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from connectors.common.blockapi import serve_block_api

BS = 524288
BACKEND = "tests.harness.blockfile:FileBlocks"


def _calls(log: Path) -> list[str]:
    return log.read_text().split("\n")[:-1] if log.exists() else []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, int]:
    size = 6 * BS + 100 * 1024  # a partial last block
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(BS + 4096)
        f.write(os.urandom(BS))          # blocks 1 and 2
        f.seek(5 * BS)
        f.write(os.urandom(BS + 50 * 1024))  # block 5 and part of the last
    return path, size


def test_reads_only_blocks_with_data_and_reports_holes(disk: tuple[Path, int], tmp_path: Path) -> None:
    path, size = disk
    log = tmp_path / "calls.log"
    server = serve_block_api(BACKEND, {"path": str(path), "size": size, "log": str(log)},
                             writable=False, what="test disk")
    try:
        out = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", server.uri, str(out)], check=True)
        assert _sha(out) == _sha(path)
        reads = [c for c in _calls(log) if c.startswith("r ")]
        assert sorted({int(c.split()[1]) for c in reads}) == [1, 2, 5, 6]
        holes = subprocess.run(["nbdinfo", "--map", server.uri], check=True, capture_output=True,
                               text=True).stdout
        rows = [line.split() for line in holes.splitlines()]
        data = [(int(r[0]), int(r[1])) for r in rows if r[2] == "0"]
        assert data == [(BS, 2 * BS), (5 * BS, size - 5 * BS)]
        bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4096", server.uri],
                             capture_output=True, text=True)
        assert "Permission denied" in bad.stderr + bad.stdout or bad.returncode != 0
    finally:
        server.stop()
    assert not server.directory.exists()


def test_writes_whole_blocks_and_read_modify_writes_partial_ones(disk: tuple[Path, int],
                                                                  tmp_path: Path) -> None:
    path, size = disk
    log = tmp_path / "calls.log"
    expected = bytearray(path.read_bytes())
    server = serve_block_api(BACKEND, {"path": str(path), "size": size, "log": str(log)},
                             writable=True, what="test disk")
    try:
        def io(cmd: str) -> None:
            subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, server.uri], check=True,
                           capture_output=True)
        io(f"write -P 0x11 {3 * BS} {BS}")                # a whole block: one write, no read
        expected[3 * BS:4 * BS] = b"\x11" * BS
        io(f"write -P 0x22 {BS + 1000} 2000")             # partial: read block 1, write it
        expected[BS + 1000:BS + 3000] = b"\x22" * 2000
        io(f"write -z {5 * BS} {BS}")                     # zeroing a block with data writes zeros
        expected[5 * BS:6 * BS] = bytes(BS)
        io(f"write -z {4 * BS} {BS}")                     # zeroing a hole costs nothing
        io(f"write -P 0x33 {size - 512} 512")             # the partial last block
        expected[size - 512:] = b"\x33" * 512
        io("flush")
    finally:
        server.stop()
    assert path.read_bytes() == bytes(expected)
    assert os.path.getsize(path) == size
    assert _calls(log) == ["w 3", "r 1", "w 1", "w 5", "r 6", "w 6"]

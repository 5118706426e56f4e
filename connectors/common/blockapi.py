"""Serve a block API (EBS direct, Azure page blobs, …) as an NBD export.

Clouds whose disks are read and written through an HTTP API of fixed-size blocks,
not through NBD, still meet blockstream at an NBD endpoint: nbdkit's Python plugin
(Debian ``nbdkit-plugin-python``) runs ``nbdkit_blockapi_plugin.py``, which loads a
connector's *block backend* and serves it through ``BlockExport`` (blockexport.py). The
engine's data path is unchanged (blockstream, its manifests, verify, pull and push
between sites) and the cloud API sees only whole blocks:

* reads are split into the API's blocks; a block the backend says holds no data
  reads as zeros without an API call, and block status reports it as a hole, so
  a full copy and verify touch only written blocks;
* writes of whole blocks go straight to the API; a partial block is a
  read-modify-write over the block's current content (the parent point's block for
  a fresh staging), serialized per block. Targets that declare their block as
  ``write_granularity`` get a manifest of that block size, so blockstream only
  writes whole blocks and read-modify-write is left to a disk's last block;
* zeroing a block that holds data writes a zero block (a block API cannot punch a
  hole); zeroing a block without data is free.

A backend (``BlockBackend``) needs only the standard library and its platform's
SDK: it runs inside nbdkit's embedded interpreter (Debian's Python, with the
worker's site-packages on ``sys.path``), not in the worker.
"""

from __future__ import annotations

import json
import os
import site
import sys
from pathlib import Path
from typing import Any

from connectors.base import PermanentError
from connectors.common.blockexport import BlockBackend, BlockExport
from connectors.common.sockserver import SocketServer, write_secret

PLUGIN = Path(__file__).with_name("nbdkit_blockapi_plugin.py")
__all__ = ["PLUGIN", "BlockBackend", "BlockExport", "serve_block_api"]


# --------------------------------------------------------------------------- serving


def plugin_sys_path() -> list[str]:
    """Where nbdkit's embedded Python finds the worker's packages (boto3, this project):
    its site-packages and the project root."""
    root = str(Path(__file__).resolve().parents[2])
    return [*site.getsitepackages(), root]


def serve_block_api(backend: str, params: dict[str, Any], *, writable: bool, what: str,
                    connections: int = 16) -> SocketServer:
    """Start nbdkit serving ``backend`` (``"package.module:Class"``, constructed inside
    nbdkit as ``Class(params)``) on a private unix socket. ``params`` may hold
    credentials: they go to a 0600 file in the export's directory, never into argv."""
    if not _python_plugin_available():
        raise PermanentError("nbdkit's Python plugin is not installed (Debian package "
                             "nbdkit-plugin-python): block-API platforms are served through it")

    def command(directory: Path, sock: Path) -> list[str]:
        cfg = {"backend": backend, "params": params, "sys_path": plugin_sys_path(),
               "workers": connections,
               "python": sys.version_info[:2]}
        conf = write_secret(directory, "backend.json", json.dumps(cfg))
        return ["nbdkit", *([] if writable else ["--readonly"]), "--exit-with-parent",
                "--foreground", "--unix", str(sock), "--threads", str(connections),
                "python", str(PLUGIN), f"config={conf}"]

    return SocketServer.start(command, what, prefix="blk")


def _python_plugin_available() -> bool:
    for d in ("/usr/lib/x86_64-linux-gnu/nbdkit/plugins", "/usr/lib/aarch64-linux-gnu/nbdkit/plugins",
              "/usr/lib64/nbdkit/plugins", "/usr/lib/nbdkit/plugins"):
        if os.path.exists(os.path.join(d, "nbdkit-python-plugin.so")):
            return True
    return False

"""nbdkit Python plugin (API v2): a connector's block backend as an NBD export.

Started by ``connectors.common.blockapi.serve_block_api`` as
``nbdkit python nbdkit_blockapi_plugin.py config=FILE``; FILE (0600, in the export's
private directory) names the backend class, its parameters and the worker's
``sys.path`` entries. Everything else is ``BlockExport``'s.
"""

from __future__ import annotations

import builtins
import errno
import importlib
import json
import sys
from typing import Any

import nbdkit  # provided by nbdkit's embedded interpreter

API_VERSION = 2
_config_path = ""
_export: Any = None


def config(key: str, value: str) -> None:
    global _config_path
    if key != "config":
        raise RuntimeError(f"unknown parameter {key!r} (only config=FILE)")
    _config_path = value


def config_complete() -> None:
    global _export
    if not _config_path:
        raise RuntimeError("config=FILE is required")
    with builtins.open(_config_path) as f:
        cfg = json.load(f)
    for p in reversed(cfg["sys_path"]):
        if p not in sys.path:
            sys.path.insert(0, p)
    from connectors.common.blockexport import BlockExport

    module, _, cls = str(cfg["backend"]).partition(":")
    backend = getattr(importlib.import_module(module), cls)(cfg["params"])
    _export = BlockExport(backend, workers=int(cfg.get("workers", 16)))


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def open(readonly: bool) -> int:
    return 1


def get_size(h: int) -> int:
    return int(_export.size)


def block_size(h: int) -> tuple[int, int, int]:
    # Any byte range is served; whole blocks cost one API call each.
    return (1, int(_export.bs), 32 << 20)


def can_multi_conn(h: int) -> bool:
    # Every write is stored by the API before it is acknowledged, and flush makes the
    # backend's local record durable for all connections alike.
    return True


def can_write(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_zero(h: int) -> bool:
    return True


def can_trim(h: int) -> bool:
    return False


def can_extents(h: int) -> bool:
    return True


def can_cache(h: int) -> int:
    return int(nbdkit.CACHE_NONE)


def pread(h: int, buf: Any, offset: int, flags: int) -> None:
    try:
        _export.pread(memoryview(buf), offset)
    except Exception as e:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"read at {offset}: {e}") from e


def pwrite(h: int, buf: Any, offset: int, flags: int) -> None:
    try:
        _export.pwrite(memoryview(buf), offset)
    except Exception as e:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"write at {offset}: {e}") from e


def zero(h: int, count: int, offset: int, flags: int) -> None:
    _export.zero(count, offset)


def flush(h: int, flags: int) -> None:
    _export.flush()


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    return list(_export.extents(count, offset))

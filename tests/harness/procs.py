"""Finding processes by their command line (what a test or benchmark left running)."""

from __future__ import annotations

import os
from pathlib import Path


def command_lines() -> dict[int, str]:
    """Every other process's command line, arguments joined by spaces."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            raw = (d / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if raw:
            out[int(d.name)] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return out


def processes_mentioning(marker: str, *, exclude: tuple[str, ...] = ()) -> list[int]:
    """Pids whose command line contains ``marker`` and none of ``exclude``."""
    return [pid for pid, cmd in command_lines().items()
            if marker in cmd and not any(x in cmd for x in exclude)]

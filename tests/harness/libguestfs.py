"""libguestfs for the tests' workers: the appliance kernel, and TCG.

libguestfs boots its appliance with the host's kernel from /boot. This machine (a
microVM) has none: scripts/setup.sh unpacks Debian's cloud kernel into
``KERNEL_DIR`` and the SUPERMIN_* variables point libguestfs at it. Nested KVM
fails for the appliance here (QEMU reports a KVM emulation failure), so it runs
under TCG (``force_tcg``): about 20 s per appliance start.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

KERNEL_DIR = Path("/var/cache/transcend-libguestfs-kernel")


def environment() -> dict[str, str]:
    """The variables to give a worker (empty where the host needs none)."""
    env = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
    version_file = KERNEL_DIR / "version"
    if not glob.glob("/boot/vmlinuz-*") and version_file.exists():
        version = version_file.read_text().strip()
        env |= {"SUPERMIN_KERNEL": str(KERNEL_DIR / "boot" / f"vmlinuz-{version}"),
                "SUPERMIN_MODULES": str(KERNEL_DIR / "lib" / "modules" / version),
                "SUPERMIN_KERNEL_VERSION": version}
    return env


def apply() -> None:
    """Into this process's environment, so every worker the tests start inherits it
    (an operator's own setting wins)."""
    for k, v in environment().items():
        os.environ.setdefault(k, v)

"""A catalog with one protection and no replication behind it, for CLI tests that need
something to name: platforms ``src`` (KVM, qemu:///system) and ``dst`` (KVM, replicas
under ``root``) and protection ``web`` of VM ``vm1``, RPO 15 minutes."""

from __future__ import annotations

from pathlib import Path

from transcend.catalog import Catalog
from transcend.models import (
    DiskInfo,
    PlatformSpec,
    ProtectionPolicy,
    ProtectionSpec,
    Workload,
    WorkloadRef,
)


def seed_web_protection(root: Path) -> None:
    """Into the catalog of the current settings (TRANSCEND_HOME)."""
    cat = Catalog.from_settings()
    try:
        cat.add_platform(PlatformSpec(name="src", kind="kvm", config={"uri": "qemu:///system"}))
        cat.add_platform(PlatformSpec(name="dst", kind="kvm", config={"root": str(root / "r")}))
        wl = Workload(ref=WorkloadRef(platform="src", id="vm1"), name="vm1", cpus=1,
                      memory_mib=64, disks=[DiskInfo(id="vda", size=1 << 20)])
        cat.add_protection(ProtectionSpec(name="web", source_platform="src", workloads=["vm1"],
                                          target_platform="dst",
                                          policy=ProtectionPolicy(rpo_seconds=900)), [wl])
    finally:
        cat.close()

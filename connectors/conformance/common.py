"""What the conformance checks share: the thing under test, the failure, NBD reads."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Protocol

from connectors.base import (
    DirectDisks,
    HealthProbe,
    PowerControl,
    Source,
    Target,
    capabilities_of,
)
from transcend.models import DiskId, Workload

G = 64 * 1024
MiB = 1 << 20
#: The size of the one disk a SourceUnderTest's VM has.
DISK_SIZE = 32 * MiB


class ConformanceError(AssertionError):
    """A connector does not do what the contract (connectors/base.py) says."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


class SourceUnderTest(Protocol):
    """A source connector with one VM of one ``DISK_SIZE`` disk to run the checks on (a
    platform whose disks cannot be that small gives its size as ``disk_size``; the
    writes stay in the first ``DISK_SIZE`` bytes)."""

    kind: str
    source: Source
    workload: Workload
    disk: DiskId

    def write(self, offset: int, length: int, pattern: int) -> None:
        """Write ``length`` bytes of the byte ``pattern`` at ``offset``, as the guest."""
        ...


def read_export(uri: str, out: Path) -> bytes:
    """The whole of an NBD export, through qemu-img (not the connector's own code)."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)],
                   check=True, capture_output=True)
    return out.read_bytes()


def qemu_io(uri: str, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = subprocess.run([*args, uri], capture_output=True, text=True, check=True)
    expect("error" not in (out.stdout + out.stderr).lower(),
           f"qemu-io {' '.join(commands)} on {uri}: {out.stdout}{out.stderr}")


def check_capabilities(connector: Source | Target) -> None:
    """Every capability the connector declares is implemented (the protocol a step
    asks for is there), and nothing it implements is hidden from the activities."""
    caps = capabilities_of(connector)
    name = type(connector).__name__
    pairs = [("power", caps.power, PowerControl), ("direct_disks", caps.direct_disks, DirectDisks),
             ("health", bool(caps.health), HealthProbe)]
    for field, declared, proto in pairs:
        if declared:
            expect(isinstance(connector, proto),
                   f"{name} declares {field} but does not implement {proto.__name__}")
    expect(caps.write_granularity & (caps.write_granularity - 1) == 0,
           f"{name}: write_granularity {caps.write_granularity} is not a power of two")

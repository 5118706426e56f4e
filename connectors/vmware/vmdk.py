"""The text descriptor of a .vmdk: which file holds the bytes, and whether it is flat.

A base disk on VMFS is a descriptor (``disk.vmdk``, ``createType="vmfs"``) plus the
raw bytes (``disk-flat.vmdk``, extent type ``VMFS``); NFS and hosted flat disks say
``monolithicFlat`` / ``FLAT``. Snapshot deltas say ``vmfsSparse`` / ``seSparse`` and
name a parent; their bytes are not a raw image and only VDDK reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from connectors.base import ConnectorError

FLAT_EXTENTS = {"VMFS", "FLAT"}


@dataclass(frozen=True)
class Extent:
    access: str
    sectors: int
    kind: str
    file: str
    offset_sectors: int = 0


@dataclass(frozen=True)
class Descriptor:
    create_type: str
    extents: list[Extent]
    parent_hint: str = ""

    @property
    def flat(self) -> bool:
        """One raw extent at offset 0 and no parent: the bytes are the disk."""
        return (not self.parent_hint and len(self.extents) == 1
                and self.extents[0].kind in FLAT_EXTENTS and self.extents[0].offset_sectors == 0)

    @property
    def size(self) -> int:
        return sum(e.sectors for e in self.extents) * 512


_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"(?:\s+(\d+))?\s*$')


def parse_descriptor(text: str, name: str) -> Descriptor:
    create_type = ""
    parent = ""
    extents: list[Extent] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT.match(line)
        if m:
            extents.append(Extent(m.group(1), int(m.group(2)), m.group(3).upper(), m.group(4),
                                  int(m.group(5) or 0)))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip().strip('"')
        if key.strip() == "createType":
            create_type = value
        elif key.strip() == "parentFileNameHint":
            parent = value
    if not create_type or not extents:
        raise ConnectorError(f"{name} is not a VMDK text descriptor (no createType or extent "
                             "line); a disk without a separate descriptor cannot be read over "
                             "the datastore endpoint: configure VDDK")
    return Descriptor(create_type=create_type, extents=extents, parent_hint=parent)

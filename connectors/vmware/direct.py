"""A shut-off vSphere VM's own disks as NBD exports (``DirectDisks`` of the VMware
Source): failback writes the failed-over VM's data into them, and its verify reads them.

Production writes go through VDDK (nbdkit's ``vddk`` plugin on the VM's current disk,
no snapshot), which vSphere's Changed Block Tracking records, so the protection's next
cycle after the failback is incremental (VDDK Programming Guide, "Changed Block
Tracking on Virtual Disks"). The ``file`` writer (``writer: file`` with
``datastore_mounts``, as the VMware target has) serves the disk's data file with
qemu-nbd where the datastore is mounted on the worker: correct for flat disks without
snapshots, which is what the tests' simulator gives; never use it on VMFS deltas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from connectors.base import DiskAccess, PermanentError
from connectors.vmware.export import VddkSourceFactory, serve_file, serve_nbdkit, vddk_thumbprint
from connectors.vmware.files import config_map, data_file
from connectors.vmware.session import VsphereSession
from transcend.models import PlatformInfo


@contextlib.contextmanager
def open_disks(s: VsphereSession, info: PlatformInfo, secret: dict[str, str], ref: str, *,
               readonly: bool, disk_ids: list[str], devices: list[Any]
               ) -> Iterator[list[DiskAccess]]:
    """Exports of ``devices`` (the VM's VirtualDisks, in the workload's order, named
    ``disk_ids``), stopped when the block ends. The VM must be powered off: vSphere
    locks a running VM's disks, and writing under a running guest would corrupt it."""
    vm = s.find_vm(ref)
    if vm.runtime.powerState != "poweredOff":
        raise PermanentError(f"VM {vm.name!r} is {vm.runtime.powerState}; its disks can be "
                             "opened directly only while it is powered off")
    if not readonly and vm.snapshot is not None and info.config.get("writer") == "file":
        raise PermanentError(f"VM {vm.name!r} has snapshots: the 'file' writer can only write "
                             "a flat disk; use writer 'vddk'")
    servers: list[Any] = []
    try:
        out = []
        for did, dev in zip(disk_ids, devices, strict=True):
            what = f"{'reading' if readonly else 'writing'} disk {did} of VM {vm.name!r}"
            if info.config.get("writer") == "file":
                mounts = config_map(info.config, "datastore_mounts", info.name)
                server: Any = serve_file(data_file(mounts, dev.backing.fileName),
                                         writable=not readonly, what=what)
            else:
                if not info.config.get("vddk_libdir"):
                    raise PermanentError(f"platform {info.name!r}: writing a VM's disks needs "
                                         "vddk_libdir (docs/platforms/vmware.md)")
                server = serve_nbdkit(VddkSourceFactory(
                    password=secret.get("password", ""), libdir=str(info.config["vddk_libdir"]),
                    server=s.host, user=s.user, thumbprint=vddk_thumbprint(s.tls.thumbprint),
                    vm_moref=vm._moId, snapshot_moref="", file=dev.backing.fileName,
                    port=s.port), what, readonly=readonly)
            servers.append(server)
            out.append(DiskAccess(disk=did, size=int(dev.capacityInBytes), uri=server.uri))
        yield out
    finally:
        for server in servers:
            server.stop()

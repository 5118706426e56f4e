"""libvirt XML for what the KVM target boots: a domain on throw-away overlays of a
recovery point, and the isolated test network.

Only what the target needs. The point's layers are passed as an explicit
``<backingStore>`` chain, each with ``<seclabel model='dac' relabel='no'/>``, so
libvirt never chowns (or otherwise relabels) an immutable layer; only the overlay
is labelled for the qemu user. That user must be able to read the layers (they
are 0444) and traverse the replica root.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

METADATA_NS = "urn:transcend:instance:1"
METADATA_PREFIX = "transcend"
ISOLATED_NETWORK = "transcend-isolated"

_DEV_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "usb": "sd", "ide": "hd"}


@dataclass
class BootDisk:
    overlay: str  # the writable top (throw-away)
    chain: list[str]  # the point's layers below it, top first: [layer, its backing, ...]
    bus: str = "virtio"
    boot_order: int | None = None


@dataclass
class BootNic:
    network: str
    mac: str = ""
    model: str = "virtio"


@dataclass
class DomainShape:
    name: str
    domain_type: str = "qemu"
    cpus: int = 1
    memory_mib: int = 512
    firmware: str = "bios"  # "bios" | "efi"
    secure_boot: bool = False
    machine: str = ""
    disks: list[BootDisk] = field(default_factory=list)
    nics: list[BootNic] = field(default_factory=list)
    console_log: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def _disk_dev(bus: str, index: int) -> str:
    prefix = _DEV_PREFIX.get(bus, "vd")
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return prefix + letters


def _machine(firmware: str, secure_boot: bool, machine: str) -> str:
    """A machine type this host certainly has: the family of the source's, not its version."""
    if secure_boot or "q35" in machine:
        return "q35"
    if machine.startswith(("pc-i440fx", "pc")) or machine == "":
        return "q35" if firmware == "efi" else "pc"
    return machine


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def domain_xml(shape: DomainShape) -> str:
    dom = ET.Element("domain", type=shape.domain_type)
    _sub(dom, "name", shape.name)
    if shape.metadata:
        md = _sub(dom, "metadata")
        inst = ET.SubElement(md, f"{{{METADATA_NS}}}instance")
        for k, v in shape.metadata.items():
            _sub(inst, f"{{{METADATA_NS}}}{k}", v)
    _sub(dom, "memory", str(shape.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(shape.cpus))

    os_attrs = {"firmware": "efi"} if shape.firmware == "efi" else {}
    os_el = _sub(dom, "os", **os_attrs)
    machine = _machine(shape.firmware, shape.secure_boot, shape.machine)
    _sub(os_el, "type", "hvm", arch="x86_64", machine=machine)
    if shape.firmware == "efi":
        fw = _sub(os_el, "firmware")
        _sub(fw, "feature", enabled="yes" if shape.secure_boot else "no", name="secure-boot")

    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if shape.secure_boot:
        _sub(features, "smm", state="on")
    if shape.domain_type == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    counters: dict[str, int] = {}
    orders = [d.boot_order for d in shape.disks if d.boot_order is not None]
    q35 = machine == "q35"
    for i, disk in enumerate(shape.disks):
        bus = disk.bus if disk.bus in _DEV_PREFIX else "virtio"
        if q35 and bus == "ide":
            bus = "sata"  # q35 has no IDE controller; its AHCI takes the same guests
        prefix = _DEV_PREFIX[bus]
        idx = counters.get(prefix, 0)
        counters[prefix] = idx + 1
        el = _sub(devices, "disk", type="file", device="disk")
        _sub(el, "driver", name="qemu", type="qcow2", discard="unmap")
        _sub(el, "source", file=disk.overlay)
        parent = el
        for layer in disk.chain:
            bs = _sub(parent, "backingStore", type="file")
            _sub(bs, "format", type="qcow2")
            src = _sub(bs, "source", file=layer)
            _sub(src, "seclabel", model="dac", relabel="no")
            parent = bs
        _sub(parent, "backingStore")  # end of chain: libvirt must not probe further
        _sub(el, "target", dev=_disk_dev(bus, idx), bus=bus)
        order = disk.boot_order if orders else (1 if i == 0 else None)
        if order is not None:
            _sub(el, "boot", order=str(order))
    if any(d.bus == "scsi" for d in shape.disks):
        _sub(devices, "controller", type="scsi", model="virtio-scsi")
    for nic in shape.nics:
        el = _sub(devices, "interface", type="network")
        if nic.mac:
            _sub(el, "mac", address=nic.mac)
        _sub(el, "source", network=nic.network)
        _sub(el, "model", type=nic.model or "virtio")
    serial = _sub(devices, "serial", type="pty")
    if shape.console_log:
        _sub(serial, "log", file=shape.console_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    _sub(devices, "memballoon", model="none")

    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    return ET.tostring(dom, encoding="unicode")


def read_metadata(xml: str) -> dict[str, str]:
    """The transcend metadata of a domain's XML ({} when it is not one of ours)."""
    root = ET.fromstring(xml)
    inst = root.find(f"metadata/{{{METADATA_NS}}}instance")
    if inst is None:
        return {}
    out: dict[str, str] = {}
    for child in inst:
        tag = child.tag.split("}", 1)[-1]
        out[tag] = child.text or ""
    return out


def isolated_network_xml(name: str = ISOLATED_NETWORK) -> str:
    """A libvirt network with no <forward> and no address: a bridge only the test
    instances share; nothing routes in or out and the host has no address on it."""
    net = ET.Element("network")
    _sub(net, "name", name)
    _sub(net, "bridge", stp="on", delay="0")
    return ET.tostring(net, encoding="unicode")


def domain_disks(root: ET.Element) -> list[ET.Element]:
    """The ``<disk device='disk'>`` elements of a domain's XML (no CD-ROMs, floppies)."""
    return [d for d in root.findall("./devices/disk") if d.get("device", "disk") == "disk"]


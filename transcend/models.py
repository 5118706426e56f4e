"""Pydantic models for everything that crosses an activity, workflow or CLI boundary.

Every model is strict about its input (``extra="forbid"``) so that a typo in a
workflow input or a policy is rejected with an error naming the field, and
nothing is half-applied (DESIGN.md invariant 6).

These models are also the programmatic API: other systems import them (or
reproduce their JSON shape) to start workflows. Renaming a field is a breaking
change; see docs/workflow-api.md.
"""

from __future__ import annotations

import itertools
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from transcend.guestprep import GuestPrep, ReIpRule

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lower-case name: a-z 0-9 . _ -")]
DiskId = str


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


#: A platform kind: a built-in connector's (PlatformKind) or a plugin's (connectors/registry.py).
KindName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$",
                                description="the connector kind (kvm, vmware, ... or a plugin's)")]


class PlatformKind(StrEnum):
    """The kinds this package knows by name. The set is open: a plugin registers more
    (connectors/registry.py), so models hold kinds as ``KindName`` strings."""

    KVM = "kvm"
    CLOUDSTACK = "cloudstack"
    VMWARE = "vmware"
    HYPERV = "hyperv"
    AWS = "aws"
    AZURE = "azure"
    NUTANIX = "nutanix"
    SYNTHETIC = "synthetic"  # test code only: tests/harness/synthetic.py (a connector plugin)


# --------------------------------------------------------------------------- platforms


class PlatformSpec(Model):
    """One endpoint with credentials. ``secret`` is stored encrypted in the catalog and
    never travels through workflow history: activities load it from the catalog."""

    name: Name
    kind: KindName
    site: Name = "local"
    config: dict[str, Any] = Field(default_factory=dict, description="non-secret settings")
    secret: dict[str, str] = Field(default_factory=dict, description="credentials")


class PlatformInfo(Model):
    name: str
    kind: KindName
    site: str
    config: dict[str, Any]


# --------------------------------------------------------------------------- workloads


class DiskInfo(Model):
    id: DiskId = Field(description="stable id of the disk within its workload (KVM: target dev)")
    size: int = Field(ge=0, description="virtual size in bytes")
    name: str = ""
    bus: str = "virtio"
    boot_order: int | None = None
    source: str = Field(default="", description="where the platform keeps it (path, URL, id)")
    controller: str = Field(default="", description="controller model and number where the "
                                                    "platform has them (VMware: pvscsi:0)")
    device_key: int | None = Field(default=None, description="VMware: the disk's device key")


class NicInfo(Model):
    mac: str = ""
    network: str = ""
    model: str = "virtio"


class WorkloadRef(Model):
    platform: str
    id: str = Field(description="platform's id for the VM (KVM: domain UUID or name)")


class Workload(Model):
    ref: WorkloadRef
    name: str
    cpus: int = Field(ge=1)
    memory_mib: int = Field(ge=1)
    firmware: Literal["bios", "efi"] = "bios"
    secure_boot: bool = False
    machine: str = ""
    disks: list[DiskInfo]
    nics: list[NicInfo] = Field(default_factory=list)
    os_family: str = "linux"
    guest_os: str = Field(default="", description="the platform's guest OS id (VMware guestId)")
    power_state: str = "unknown"
    tools: str = Field(default="", description="guest agent state where the platform has one "
                                               "(VMware Tools: running, not-running, …)")


# --------------------------------------------------------------------------- policy


class RetentionRule(Model):
    """Keep one point per ``every`` seconds for ``keep_for`` seconds (every=0: all points)."""

    every: int = Field(ge=0)
    keep_for: int = Field(gt=0)


class RetentionPolicy(Model):
    rules: list[RetentionRule] = Field(min_length=1)
    min_points: int = Field(default=1, ge=1, description="never keep fewer than this")

    @classmethod
    def parse(cls, text: str) -> RetentionPolicy:
        """Parse ``"all 4h, hourly 2d, daily 2w"`` (also ``every 15m for 6h``). Each
        rule must keep something no other keeps: two rules at one granularity (``all 4h,
        all 2h``) claim the same points, and a coarser rule that keeps no longer than a
        finer one keeps nothing of its own. (Only text is checked: a policy stored
        before this rule still loads, and selection handles any rule set.)"""
        rules = [_parse_rule(part) for part in text.split(",") if part.strip()]
        by_every = sorted(rules, key=lambda r: r.every)
        for a, b in itertools.pairwise(by_every):
            name_a, name_b = _rule_text(a), _rule_text(b)
            if a.every == b.every:
                raise ValueError(f"retention rules {name_a!r} and {name_b!r} overlap: keep one "
                                 "rule per granularity (e.g. 'all 4h, hourly 2d, daily 2w')")
            if b.keep_for <= a.keep_for:
                raise ValueError(f"retention rule {name_b!r} keeps nothing that {name_a!r} does "
                                 "not already keep: a coarser rule must keep points longer")
        return cls(rules=rules)

    def describe(self) -> str:
        return ", ".join(
            f"{'all' if r.every == 0 else 'every ' + format_duration(r.every)} "
            f"for {format_duration(r.keep_for)}"
            for r in self.rules
        )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NAMED_EVERY = {"all": 0, "hourly": 3600, "daily": 86400, "weekly": 7 * 86400}


def parse_duration(text: str) -> int:
    """``"90s"``, ``"15m"``, ``"4h"``, ``"2d"``, ``"2w"`` or plain seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 4h, 2d, 2w)")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def format_duration(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def _rule_text(r: RetentionRule) -> str:
    every = "all" if r.every == 0 else f"every {format_duration(r.every)} for"
    return f"{every} {format_duration(r.keep_for)}"


def _parse_rule(text: str) -> RetentionRule:
    words = text.split()
    if len(words) == 2 and words[0] in _NAMED_EVERY:
        return RetentionRule(every=_NAMED_EVERY[words[0]], keep_for=parse_duration(words[1]))
    if len(words) == 4 and words[0] == "every" and words[2] == "for":
        return RetentionRule(every=parse_duration(words[1]), keep_for=parse_duration(words[3]))
    raise ValueError(
        f"retention rule {text.strip()!r} not understood; "
        "write e.g. 'all 4h, hourly 2d, daily 2w' or 'every 15m for 6h'"
    )


class Priority(StrEnum):
    CRITICAL = "critical"
    NORMAL = "normal"
    LOW = "low"


class ProtectionPolicy(Model):
    rpo_seconds: int = Field(ge=10, description="recovery point objective; cycles are scheduled to meet it")
    retention: RetentionPolicy = Field(
        default_factory=lambda: RetentionPolicy.parse("all 4h, hourly 2d, daily 2w")
    )
    continuous: bool = Field(default=False, description="start the next cycle as one commits")
    verify_sample_blocks: int = Field(default=64, ge=0, le=100_000)
    bandwidth_bytes_per_s: int | None = Field(default=None, gt=0)
    priority: Priority = Priority.NORMAL
    connections: int = Field(default=4, ge=1, le=16)
    network_map: dict[str, str] = Field(default_factory=dict)
    test_network: str = ""
    reip: list[ReIpRule] = Field(
        default_factory=list,
        description="runbook re-IP rules for failover and migration (the recovery site's "
                    "subnets): applied to the guest before its first boot when the operation "
                    "gives none of its own")
    test_reip: list[ReIpRule] = Field(
        default_factory=list,
        description="re-IP rules for test failovers when the operation gives none (the test "
                    "network's subnets; usually none: an isolated copy keeps its addresses)")
    test_failover_every_seconds: int | None = Field(
        default=None, ge=60,
        description="a successful test failover is due this often (a DR drill cadence); when "
                    "none succeeded for that long the test_failover_overdue alert is sent")
    transfer: Literal["auto", "local", "push", "pull"] = Field(
        default="auto",
        description="how the cycle's data reaches the target (docs/sites.md): local = NBD on "
                    "unix sockets, both sites' workers on one host; push = the target site "
                    "exports its staging over TCP with TLS and the source site writes to it; "
                    "pull = the source site exports the frozen disks over TCP with TLS and the "
                    "target site reads them (when only the source site can be dialled); "
                    "auto = local when both platforms are at the same site, push otherwise")

    @field_validator("retention", mode="before")
    @classmethod
    def _retention_text(cls, v: Any) -> Any:
        return RetentionPolicy.parse(v) if isinstance(v, str) else v


Transfer = Literal["local", "push", "pull"]


def effective_transfer(policy: ProtectionPolicy, source_site: str, target_site: str) -> Transfer:
    """The transfer mode a cycle uses: ``auto`` resolved by the platforms' sites."""
    if policy.transfer == "auto":
        return "local" if source_site == target_site else "push"
    return policy.transfer


class ProtectionSpec(Model):
    """What ``transcend protect`` and other systems submit."""

    name: Name
    source_platform: str
    workloads: list[str] = Field(min_length=1, description="VM ids or names on the source platform")
    target_platform: str
    policy: ProtectionPolicy

    @model_validator(mode="after")
    def _distinct(self) -> ProtectionSpec:
        if len(set(self.workloads)) != len(self.workloads):
            raise ValueError("workloads: the same VM is listed twice")
        return self


class ProtectionState(StrEnum):
    PREPARING = "preparing"
    PROTECTING = "protecting"
    PAUSED = "paused"
    FAILING_OVER = "failing_over"  # a failover or migration is running
    FAILED_OVER = "failed_over"  # production runs at the target; the source diverged
    FAILING_BACK = "failing_back"  # a failback is running
    REMOVED = "removed"


class Health(StrEnum):
    HEALTHY = "healthy"
    WARNING = "warning"
    FAILED = "failed"


# --------------------------------------------------------------------------- data path


class NbdEndpoint(Model):
    """An NBD export as a libnbd URI (``nbd+unix:///vda?socket=/run/x.sock``,
    ``nbds://host:10809/vda?tls-certificates=/etc/transcend/pki``)."""

    uri: str
    size: int = Field(ge=0)
    writable: bool = False


class Checkpoint(Model):
    """Source-side token of the last committed cycle for one disk."""

    disk: DiskId
    token: str = Field(description="bitmap/checkpoint name, CBT changeId, snapshot id, RCT id")
    identity: str = Field(default="", description="what the token is valid for (domain UUID, disk uuid)")
    instant: datetime | None = None


class FreezeOptions(Model):
    quiesce: bool = False
    force_resync: bool = False
    # A shut-off VM may be frozen (a migration's final cycle, a failback reading the
    # original VM): the connector makes its disks readable without running the guest.
    offline_ok: bool = False


class ChangeKind(StrEnum):
    FULL = "full"  # no checkpoint yet: copy every allocated extent
    INCREMENTAL = "incremental"  # changed extents since the checkpoint
    RESYNC = "resync"  # checkpoint lost: read everything, write only blocks whose hash differs


class ChangeSummary(Model):
    disk: DiskId
    kind: ChangeKind
    reason: str = ""
    extents: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    disk_size: int = 0
    granularity: int = 65536


class FrozenHandle(Model):
    """Serializable description of a frozen instant; any worker of the source site can
    reopen it (``Source.reopen``) after a crash, so every step stays idempotent."""

    platform: str
    protection: str
    cycle_id: str
    instant: datetime
    disks: list[DiskInfo]
    kinds: dict[DiskId, ChangeKind]
    reasons: dict[DiskId, str] = Field(default_factory=dict)
    consistency: Literal["crash", "application"] = "crash"
    data: dict[str, Any] = Field(default_factory=dict, description="connector-specific state")
    remote: dict[DiskId, NbdEndpoint] = Field(
        default_factory=dict,
        description="pull transfers: where a reader at another site reaches each frozen disk "
                    "(nbds://site_address:port/disk, without client credentials: each reader "
                    "adds its own site's); empty when the frozen disks are read locally")


#: The manifest's block size where the target allows it: the unit of hashing, change
#: planning and verify (docs/blockstream.md "Block size per target").
MANIFEST_BLOCK_SIZE = 65536


def manifest_block_size(write_granularity: int, previous: int | None = None) -> int:
    """The block size of a cycle's manifest on a target that writes ``write_granularity``
    bytes at a time: the previous point's while it is still a whole number of those
    units (its manifest carries forward), else the default or the granularity,
    whichever is larger (a manifest block is never finer than what the target writes:
    EBS direct writes 512 KiB blocks)."""
    if previous and previous % write_granularity == 0:
        return previous
    return max(MANIFEST_BLOCK_SIZE, write_granularity)


class StagingHandle(Model):
    platform: str
    protection: str
    cycle_id: str
    disks: list[DiskInfo]
    block_size: int | None = Field(
        default=None, description="the manifest block size of this cycle, chosen by "
        "target.begin from the target's write granularity (manifest_block_size); None in "
        "handles from before it: 64 KiB")
    data: dict[str, Any] = Field(default_factory=dict, description="connector-specific state")
    remote: dict[DiskId, NbdEndpoint] = Field(
        default_factory=dict,
        description="push transfers: where a writer at another site reaches each disk "
                    "(nbds://site_address:port/export, without client credentials: each "
                    "reader adds its own site's); empty when the staging is served locally")


class PointDisk(Model):
    disk: DiskId
    size: int
    location: str = Field(description="connector-specific: layer path, snapshot id, ...")
    block_size: int
    manifest_sha256: str = ""


class RecoveryPoint(Model):
    id: str
    protection: str
    seq: int
    instant: datetime
    committed_at: datetime
    consistency: Literal["crash", "application"] = "crash"
    disks: list[PointDisk]
    bytes_written: int = 0
    kind: ChangeKind = ChangeKind.INCREMENTAL


class PointMeta(Model):
    cycle_id: str
    instant: datetime
    consistency: Literal["crash", "application"] = "crash"
    block_size: int
    kind: ChangeKind
    bytes_written: int = 0
    checkpoints: list[Checkpoint] = Field(
        default_factory=list, description="source checkpoints that become current on commit"
    )


def replica_disks(workloads: list[Workload]) -> list[DiskInfo]:
    """Disks as the replica names them: the disk ids of one VM, ``<VM name>/<disk>`` for
    the members of a consistency group (their disk ids repeat: every VM has a vda)."""
    if len(workloads) == 1:
        return list(workloads[0].disks)
    return [d.model_copy(update={"id": f"{w.name}/{d.id}", "name": f"{w.name}/{d.id}"})
            for w in workloads for d in w.disks]


GuestFamily = Literal["kvm", "vmware", "hyperv", "nitro"]


class Capabilities(Model):
    """What a connector can do, declared by the connector and asked by the activities
    (connectors/base.py, "Capabilities"). Activities never test a platform's kind."""

    guest_family: GuestFamily = Field(
        default="kvm", description="the drivers a guest needs to boot on this platform: kvm "
        "(virtio: KVM, CloudStack, Nutanix AHV), vmware (pvscsi, vmxnet3), hyperv (Hyper-V "
        "and Azure: hv_vmbus, hv_storvsc, hv_netvsc), nitro (AWS: nvme, ena)")
    power: bool = Field(default=False, description="Source: state, shutdown and start of "
                        "its VMs, also of instances its platform's target booted (PowerControl)")
    direct_disks: bool = Field(default=False, description="Source: a shut-off VM's own disks "
                               "as NBD exports, writable (DirectDisks): failback writes into "
                               "them, its verify reads them")
    serve_remote: bool = Field(default=False, description="Source: frozen disks served over "
                               "TLS to a worker of another site (pull transfers, failback "
                               "between sites)")
    health: list[Literal["console", "agent", "tcp"]] = Field(
        default_factory=list, description="Target: where a booted instance's health can be "
        "read (HealthProbe): its console output, its guest agent, a TCP probe of its address")
    tracking_at_boot: bool = Field(default=False, description="Target: a production boot "
                                   "tracks every write from its first instruction, so a "
                                   "failback copies only what changed")
    write_granularity: int = Field(default=512, ge=512, le=4 << 20, description="Target: the "
                                   "smallest unit it writes (bytes, a power of two); the "
                                   "manifest's block size is never finer")

    @field_validator("write_granularity")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"write_granularity must be a power of two, got {v}")
        return v


class BootSpec(Model):
    name: str
    network: str = Field(default="", description="target network; empty = isolated")
    isolated: bool = True
    cpus: int | None = None
    memory_mib: int | None = None
    workload: Workload | None = None
    # Failover: the VM is the new production one. Its change tracking starts before
    # its first instruction (Instance.tracking), so a failback copies only what changed.
    production: bool = False
    tracking_name: str = ""
    # Runbook: source network name -> target network name, for NICs not given ``network``.
    network_map: dict[str, str] = Field(default_factory=dict)
    # Before the first boot, on the overlays (transcend/guestprep.py): conversion, re-IP.
    guest_prep: GuestPrep | None = None


class Instance(Model):
    platform: str
    id: str
    name: str
    console_log: str = ""
    overlays: list[str] = Field(default_factory=list)
    network: str = ""
    state: str = "running"
    tracking: str = Field(default="", description="checkpoint started at boot (production)")
    tracking_checkpoints: list[Checkpoint] = Field(
        default_factory=list,
        description="per-disk change-tracking tokens taken before the first write of a "
                    "production boot (connectors whose tokens are per disk, e.g. CBT "
                    "changeIds); empty: every disk's token is ``tracking``")
    prepared: list[str] = Field(default_factory=list, description="what was done to the guest "
                                "before its first boot (conversion, re-IP)")

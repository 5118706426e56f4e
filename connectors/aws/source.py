"""AWS EC2 source: multi-volume snapshots + EBS direct's changed blocks.

One cycle:

* ``freeze`` takes ``CreateSnapshots`` of the instance: every EBS volume at one
  crash-consistent instant, tagged ``transcend:protection``/``transcend:cycle``, and
  waits until they complete (EBS direct reads only completed snapshots). A retried
  freeze finds the cycle's snapshots by their tags and reuses them; snapshots a
  crashed earlier cycle of the protection left are deleted.
* ``changes``: ``ListChangedBlocks`` between the volume's checkpoint snapshot (the
  previous cycle's) and the new one, every page; blocks the new snapshot no longer
  holds are zero extents. First cycle: ``ListSnapshotBlocks`` (written blocks only).
  A checkpoint snapshot that is gone, of another volume, or that EBS will not diff
  against the new one makes that disk RESYNC (decided at freeze): all of it is read
  and only blocks whose hash differs from the replica are written.
* ``export`` serves the snapshot as an NBD export through nbdkit's Python plugin
  (connectors/common/blockapi.py) reading ``GetSnapshotBlock`` with its checksum
  checked, many requests in flight.
* ``release``: committed, the new snapshots are the checkpoints and the previous
  ones are deleted; not committed, the new ones are deleted and the previous
  checkpoints stay, so the next cycle still sees every change.

Groups of instances are refused: EC2 snapshots one instance's volumes at one instant,
not several instances.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from connectors.aws import ebs_blocks, snapshots
from connectors.aws.config import AwsConfig
from connectors.aws.inventory import POWER, Inventory
from connectors.aws.session import AwsSession, error_code, translate
from connectors.base import ChangeExtent, ChangeSet, ConnectorError, PermanentError
from connectors.common.blockapi import serve_block_api
from connectors.common.sockserver import SocketServer
from transcend.models import (
    Capabilities,
    ChangeKind,
    ChangeSummary,
    Checkpoint,
    DiskId,
    DiskInfo,
    FreezeOptions,
    FrozenHandle,
    NbdEndpoint,
    PlatformInfo,
    Workload,
)

log = logging.getLogger(__name__)

BLOCK = ebs_blocks.BLOCK
READER = "connectors.aws.ebs_blocks:SnapshotReader"
ROLE = "source"


class AwsSource:
    """``Source`` for the EC2 instances of one account and region."""

    config_model = AwsConfig
    #: power: failover and migration stop the source instance, failback starts it.
    capabilities = Capabilities(guest_family="nitro", power=True)

    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.info = info
        self.s = AwsSession(info, secret)
        self.inv = Inventory(self.s)

    def vm_namespace(self) -> str:
        return f"aws:{self.s.region}:{self.s.config.endpoint_url}"

    def check(self) -> list[str]:
        return self.s.describe()

    def inventory(self) -> list[Workload]:
        return [self.inv.workload(i, self.info.name) for i in self.inv.instances()]

    def workload(self, ref_or_name: str) -> Workload:
        return self.inv.workload(self.inv.instance(ref_or_name), self.info.name)

    # ------------------------------------------------------------------ power

    def power_state(self, vm: str) -> str:
        return POWER.get(self.inv.instance(vm)["State"]["Name"], "unknown")

    def power_off(self, vm: str, timeout_seconds: float, force: bool) -> bool:
        """StopInstances (EC2 signals the guest to shut down), then a forced stop when the
        guest did not stop within ``timeout_seconds`` and ``force``."""
        inst = self.inv.instance(vm)
        iid = inst["InstanceId"]
        if inst["State"]["Name"] in ("stopped", "terminated"):
            return False
        self._call(lambda: self.s.ec2.stop_instances(InstanceIds=[iid]), f"stopping {iid}")
        if self._wait_state(iid, "stopped", timeout_seconds):
            return True
        if not force:
            raise ConnectorError(f"instance {iid} did not stop within {timeout_seconds:.0f}s "
                                 "(its guest ignored the shutdown); force it or stop it yourself")
        self._call(lambda: self.s.ec2.stop_instances(InstanceIds=[iid], Force=True),
                   f"force-stopping {iid}")
        if not self._wait_state(iid, "stopped", 600):
            raise ConnectorError(f"instance {iid} did not stop even when forced")
        return True

    def power_on(self, vm: str) -> None:
        iid = self.inv.instance(vm)["InstanceId"]
        self._call(lambda: self.s.ec2.start_instances(InstanceIds=[iid]), f"starting {iid}")
        if not self._wait_state(iid, "running", 600):
            raise ConnectorError(f"instance {iid} did not start within 600s")

    def settle(self, vm: str) -> None:
        """Nothing to undo on the instance: a freeze only takes snapshots, and the ones a
        crashed cycle left are removed by the next freeze (or forget)."""

    def _wait_state(self, iid: str, state: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.inv.instance(iid)["State"]["Name"] == state:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(snapshots.WAIT_DELAY)

    @staticmethod
    def _call(fn: Any, doing: str) -> Any:
        try:
            return fn()
        except (ClientError, BotoCoreError) as e:
            raise translate(e, doing) from e

    # ------------------------------------------------------------------ freeze

    def freeze(self, protection: str, cycle_id: str, workloads: list[Workload],
               since: dict[DiskId, Checkpoint], opts: FreezeOptions) -> AwsFrozen:
        if len(workloads) != 1:
            raise PermanentError(
                "EC2 snapshots one instance's volumes at one instant, not several instances: "
                "an AWS source protects one instance per protection" if workloads
                else "nothing to freeze: no instance given")
        wl = workloads[0]
        inst = self.inv.instance(wl.ref.id)
        if inst["State"]["Name"] not in ("running", "stopped") or (
                inst["State"]["Name"] == "stopped" and not opts.offline_ok):
            raise ConnectorError(f"instance {wl.name} is {inst['State']['Name']}: nothing to "
                                 "snapshot consistently now")
        current = self.inv.workload(inst, self.info.name)
        taken = snapshots.find(self.s, protection=protection, cycle=cycle_id, role=ROLE)
        if not taken:
            self._remove_stale(protection, keep={c.token for c in since.values()})
            taken = self._create(inst["InstanceId"], protection, cycle_id)
        by_volume = {x["VolumeId"]: x for x in taken}
        missing = [d.id for d in current.disks if d.source not in by_volume]
        if missing:
            raise ConnectorError(f"the snapshots of cycle {cycle_id} miss disks {missing} of "
                                 f"{wl.name} (a volume was attached meanwhile); retry")
        snapshots.wait_completed(self.s, [x["SnapshotId"] for x in taken],
                                 f"the freeze of {wl.name}")
        handle = self._plan(protection, cycle_id, current, by_volume, since, opts)
        return AwsFrozen(self, handle)

    def _create(self, instance_id: str, protection: str, cycle_id: str) -> list[dict[str, Any]]:
        try:
            r = self.s.ec2.create_snapshots(
                InstanceSpecification={"InstanceId": instance_id, "ExcludeBootVolume": False},
                Description=f"transcend {protection} cycle {cycle_id}",
                TagSpecifications=[{"ResourceType": "snapshot",
                                    "Tags": snapshots.tags(protection, cycle_id, ROLE)}])
        except (ClientError, BotoCoreError) as e:
            raise translate(e, f"snapshotting instance {instance_id}") from e
        return [{"SnapshotId": x["SnapshotId"], "VolumeId": x["VolumeId"],
                 "StartTime": x.get("StartTime")} for x in r["Snapshots"]]

    def _remove_stale(self, protection: str, keep: set[str]) -> None:
        for snap in snapshots.find(self.s, protection=protection, role=ROLE):
            if snap["SnapshotId"] not in keep:
                log.info("removing snapshot %s a crashed cycle of %s left", snap["SnapshotId"],
                         protection)
                snapshots.delete_owned(self.s, snap["SnapshotId"], protection)

    def _plan(self, protection: str, cycle_id: str, wl: Workload, by_volume: dict[str, Any],
              since: dict[DiskId, Checkpoint], opts: FreezeOptions) -> FrozenHandle:
        kinds: dict[DiskId, ChangeKind] = {}
        reasons: dict[DiskId, str] = {}
        disks: dict[str, dict[str, str]] = {}
        for d in wl.disks:
            new = by_volume[d.source]["SnapshotId"]
            ckpt = since.get(d.id)
            kind, reason = ChangeKind.FULL, ""
            if opts.force_resync:
                kind, reason = ChangeKind.RESYNC, "resync requested"
            elif ckpt is not None:
                kind, reason = self._lineage(d, ckpt, new)
            kinds[d.id], reasons[d.id] = kind, reason
            disks[d.id] = {"volume": d.source, "snapshot": new,
                           "since": ckpt.token if ckpt and kind == ChangeKind.INCREMENTAL else ""}
            if reason:
                log.warning("disk %s of %s: %s", d.id, wl.name, reason)
        instant = min((x["StartTime"] for x in by_volume.values() if x.get("StartTime")),
                      default=None)
        return FrozenHandle(
            platform=self.info.name, protection=protection, cycle_id=cycle_id,
            instant=instant or _now(), disks=list(wl.disks), kinds=kinds, reasons=reasons,
            consistency="crash",
            data={"instance": wl.ref.id, "name": wl.name, "disks": disks,
                  "previous": {d: c.token for d, c in since.items()}})

    def _lineage(self, d: DiskInfo, ckpt: Checkpoint, new: str) -> tuple[ChangeKind, str]:
        """INCREMENTAL when EBS can diff the checkpoint against the new snapshot; else
        RESYNC with why (never a silent partial copy)."""
        if ckpt.identity and ckpt.identity != d.source:
            return ChangeKind.RESYNC, (f"the disk is now volume {d.source}, the checkpoint "
                                       f"belongs to {ckpt.identity} (volume replaced)")
        old = snapshots.describe(self.s, ckpt.token)
        if old is None:
            return ChangeKind.RESYNC, f"the checkpoint snapshot {ckpt.token} was deleted"
        if old.get("State") != "completed":
            return ChangeKind.RESYNC, f"the checkpoint snapshot {ckpt.token} is {old.get('State')}"
        try:
            self.s.ebs.list_changed_blocks(FirstSnapshotId=ckpt.token, SecondSnapshotId=new,
                                           MaxResults=100)
        except ClientError as e:
            if error_code(e) in ("ValidationException", "ResourceNotFoundException"):
                return ChangeKind.RESYNC, (f"EBS will not compare the checkpoint snapshot "
                                           f"{ckpt.token} with {new}: {e}")
            raise translate(e, f"comparing snapshots of disk {d.id}") from e
        return ChangeKind.INCREMENTAL, ""

    def reopen(self, handle: FrozenHandle) -> AwsFrozen:
        return AwsFrozen(self, handle)

    def forget(self, protection: str, workloads: list[Workload]) -> list[str]:
        """Delete every snapshot the protection took at the source (its checkpoints and a
        freeze never released). Nothing else of ours lives on the instance."""
        removed = []
        volumes = {d.source for wl in workloads for d in wl.disks}
        for snap in snapshots.find(self.s, protection=protection, role=ROLE):
            if volumes and snap.get("VolumeId") not in volumes:
                continue
            if snapshots.delete_owned(self.s, snap["SnapshotId"], protection):
                removed.append(f"snapshot {snap['SnapshotId']} of {snap.get('VolumeId')}")
        return removed


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


class AwsFrozen:
    def __init__(self, source: AwsSource, handle: FrozenHandle) -> None:
        self.source = source
        self.handle = handle
        self._exports: list[SocketServer] = []

    def _disk(self, disk: DiskId) -> tuple[DiskInfo, dict[str, str]]:
        for d in self.handle.disks:
            if d.id == disk:
                return d, self.handle.data["disks"][disk]
        raise PermanentError(f"disk {disk!r} is not part of this frozen instant")

    def changes(self, disk: DiskId) -> ChangeSet:
        d, info = self._disk(disk)
        kind = self.handle.kinds[disk]
        ebs = self.source.s.ebs
        try:
            if kind == ChangeKind.INCREMENTAL:
                blocks = [(i, not token) for i, token in
                          ebs_blocks.changed_blocks(ebs, info["since"], info["snapshot"])]
            else:
                written = ebs_blocks.snapshot_blocks(ebs, info["snapshot"])
                if kind == ChangeKind.FULL:
                    blocks = [(i, False) for i in sorted(written)]
                else:  # RESYNC: the whole disk, blocks never written compared as zeros
                    blocks = [(i, i not in written) for i in range((d.size + BLOCK - 1) // BLOCK)]
        except (ClientError, BotoCoreError) as e:
            raise translate(e, f"listing the blocks of disk {disk} of "
                               f"{self.handle.data['name']}") from e
        extents = _extents(blocks, d.size)
        return ChangeSet(
            summary=ChangeSummary(
                disk=disk, kind=kind, reason=self.handle.reasons.get(disk, ""),
                extents=len(extents), data_bytes=sum(e.length for e in extents if not e.zero),
                zero_bytes=sum(e.length for e in extents if e.zero), disk_size=d.size,
                granularity=BLOCK),
            extents=extents)

    def export(self, disk: DiskId) -> NbdEndpoint:
        d, info = self._disk(disk)
        server = serve_block_api(READER, {**self.source.s.params, "snapshot": info["snapshot"],
                                          "size": d.size}, writable=False,
                                 connections=self.source.s.config.connections,
                                 what=f"snapshot {info['snapshot']} of disk {disk}")
        self._exports.append(server)
        return NbdEndpoint(uri=server.uri, size=d.size)

    def close(self) -> None:
        for e in self._exports:
            e.stop()
        self._exports.clear()

    def new_checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint(disk=d.id, token=self.handle.data["disks"][d.id]["snapshot"],
                           identity=self.handle.data["disks"][d.id]["volume"],
                           instant=self.handle.instant) for d in self.handle.disks]

    def release(self, committed: bool) -> None:
        """Committed: delete the previous checkpoint snapshots (the new ones replace them).
        Not committed: delete the new ones; the previous checkpoints stay current."""
        self.close()
        s, protection = self.source.s, self.handle.protection
        new = {info["snapshot"] for info in self.handle.data["disks"].values()}
        doomed = ([t for t in self.handle.data.get("previous", {}).values() if t not in new]
                  if committed else sorted(new))
        for snapshot_id in doomed:
            try:
                snapshots.delete_owned(s, snapshot_id, protection)
            except ConnectorError as e:
                log.warning("release of cycle %s: %s", self.handle.cycle_id, e)


def _extents(blocks: list[tuple[int, bool]], size: int) -> list[ChangeExtent]:
    """(block index, zero) pairs, ascending, as merged extents clipped to the disk."""
    out: list[ChangeExtent] = []
    for index, zero in blocks:
        start = index * BLOCK
        if start >= size:
            continue
        length = min(BLOCK, size - start)
        if out and out[-1].zero == zero and out[-1].offset + out[-1].length == start:
            last = out.pop()
            out.append(ChangeExtent(last.offset, last.length + length, zero))
        else:
            out.append(ChangeExtent(start, length, zero))
    return out

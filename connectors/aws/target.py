"""AWS target: the replica is a chain of EBS snapshots written through EBS direct.

Each recovery point is one snapshot per disk. ``begin`` starts a snapshot whose
``ParentSnapshotId`` is the previous point's (``StartSnapshot``), so blocks the
cycle does not write are inherited; blockstream writes the changed blocks through
an NBD export served by nbdkit's Python plugin (connectors/common/blockapi.py),
512 KiB ``PutSnapshotBlock`` calls with their SHA-256, journaled locally. The
target declares that block as its write granularity, so the manifest's blocks are
512 KiB and no write needs a read-modify-write except a disk's partial last block.
``commit`` is ``CompleteSnapshot`` with the block count and the LINEAR aggregate
checksum of the journal, then waits for ``completed``; ``abort`` deletes the pending
snapshots. Retention deletes a point's snapshots: EBS keeps the blocks its children
inherit, so a surviving point's content never changes.

Boot (test failover, failover): ``RegisterImage`` from the point's snapshots and
``RunInstances`` of it, in the subnet the operator named (a test failover needs
``test_subnet``; transcend never guesses a production network). ``destroy``
terminates the instance (its volumes go with it) and deregisters the image.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from connectors.aws import ebs_blocks, snapshots
from connectors.aws.config import AwsConfig
from connectors.aws.inventory import GIB, Inventory, tag
from connectors.aws.session import AwsSession, error_code, translate
from connectors.base import ConnectorError, NotFound, PermanentError
from connectors.common.blockapi import serve_block_api
from connectors.common.sockserver import SocketServer
from transcend.config import settings
from transcend.models import (
    BootSpec,
    Capabilities,
    DiskId,
    DiskInfo,
    Instance,
    NbdEndpoint,
    PlatformInfo,
    PointMeta,
    RecoveryPoint,
    StagingHandle,
    Workload,
)

log = logging.getLogger(__name__)

WRITER = "connectors.aws.ebs_blocks:SnapshotWriter"
READER = "connectors.aws.ebs_blocks:SnapshotReader"
ROLE = "point"
INSTANCE_TAG = "transcend:instance-of"
#: (vCPUs, MiB) -> the smallest general-purpose type that fits, in order.
TYPES = [(2, 2048, "t3.small"), (2, 4096, "t3.medium"), (2, 8192, "t3.large"),
         (4, 16384, "m6i.xlarge"), (8, 32768, "m6i.2xlarge"), (16, 65536, "m6i.4xlarge"),
         (32, 131072, "m6i.8xlarge"), (64, 262144, "m6i.16xlarge")]

_OPEN: dict[tuple[str, str], SocketServer] = {}


def volume_gib(size: int) -> int:
    return max(1, (size + GIB - 1) // GIB)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


class AwsTarget:
    """``Target`` on one AWS account and region (config: connectors/aws/config.py)."""

    config_model = AwsConfig
    #: health: EC2 console output, the instance's status checks, its private address.
    capabilities = Capabilities(guest_family="nitro", write_granularity=ebs_blocks.BLOCK,
                                health=["console", "agent", "tcp"])

    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.info = info
        self.s = AwsSession(info, secret)
        self.config = self.s.config
        self.work_dir = Path(self.config.work_dir or settings().home / "aws" / _safe(info.name))

    def vm_namespace(self) -> str:
        return f"aws:{self.s.region}:{self.config.endpoint_url}"

    def check(self) -> list[str]:
        return self.s.describe()

    # ------------------------------------------------------------------ staging

    def prepare(self, protection: str, disks: list[DiskInfo], workloads: list[Workload]) -> None:
        """Nothing to create: a point is a snapshot, made by ``begin``; a grown disk's next
        snapshot is started with the larger size."""

    def begin(self, protection: str, cycle_id: str, disks: list[DiskInfo],
              last: RecoveryPoint | None) -> AwsStaging:
        parents = {p.disk: p.location for p in last.disks} if last is not None else {}
        journals = self.work_dir / _safe(protection)
        journals.mkdir(parents=True, exist_ok=True)
        staged: dict[str, dict[str, str]] = {}
        try:
            for d in disks:
                parent = parents.get(d.id, "")
                staged[d.id] = {"snapshot": self._start(protection, cycle_id, d, parent),
                                "parent": parent,
                                "journal": str(journals / f"{_safe(cycle_id)}-{_safe(d.id)}.journal")}
        except BaseException:
            for info in staged.values():  # nothing half-made: no pending snapshot left
                with contextlib.suppress(Exception):
                    snapshots.delete_owned(self.s, info["snapshot"], protection)
            raise
        handle = StagingHandle(platform=self.info.name, protection=protection, cycle_id=cycle_id,
                               disks=list(disks), data={"disks": staged})
        return AwsStaging(self, handle)

    def _start(self, protection: str, cycle_id: str, d: DiskInfo, parent: str) -> str:
        """The cycle's pending snapshot of one disk (found again by its tags when a retried
        begin already started it)."""
        for snap in snapshots.find(self.s, protection=protection, cycle=cycle_id, role=ROLE,
                                   disk=d.id):
            if snap["State"] == "pending":
                return str(snap["SnapshotId"])
            if snap["State"] == "completed":
                raise PermanentError(f"cycle {cycle_id} of {protection!r} is already committed: "
                                     "retry its commit instead of beginning it again")
            snapshots.delete_owned(self.s, snap["SnapshotId"], protection)
        kwargs: dict[str, Any] = {
            "VolumeSize": volume_gib(d.size), "ClientToken": str(uuid.uuid4()),
            "Timeout": self.config.staging_timeout_minutes,
            "Description": f"transcend {protection} point of cycle {cycle_id}, disk {d.id}",
            "Tags": snapshots.tags(protection, cycle_id, ROLE, **{snapshots.DISK_TAG: d.id})}
        if parent:
            parent_snap = snapshots.describe(self.s, parent)
            if parent_snap is None:
                raise NotFound(f"the snapshot {parent} of the last point of {protection!r} "
                               f"(disk {d.id}) is gone: it was deleted outside transcend; "
                               "resync the protection")
            kwargs["ParentSnapshotId"] = parent
            kwargs["VolumeSize"] = max(kwargs["VolumeSize"], int(parent_snap["VolumeSize"]))
        elif self.config.kms_key_arn or self.config.encrypted:
            kwargs["Encrypted"] = True  # only without a parent: children inherit it
            if self.config.kms_key_arn:
                kwargs["KmsKeyArn"] = self.config.kms_key_arn
        try:
            return str(self.s.ebs.start_snapshot(**kwargs)["SnapshotId"])
        except (ClientError, BotoCoreError) as e:
            raise translate(e, f"starting the snapshot of disk {d.id} of {protection!r}") from e

    def resume(self, handle: StagingHandle) -> AwsStaging:
        return AwsStaging(self, handle)

    # ------------------------------------------------------------------ points

    def open(self, point: RecoveryPoint, disk: DiskId) -> NbdEndpoint:
        pd = next((p for p in point.disks if p.disk == disk), None)
        if pd is None:
            raise NotFound(f"point {point.id} has no disk {disk!r}")
        if snapshots.describe(self.s, pd.location) is None:
            raise NotFound(f"point {point.id}: its snapshot {pd.location} of disk {disk} is gone")
        server = serve_block_api(READER, {**self.s.params, "snapshot": pd.location,
                                          "size": pd.size}, writable=False,
                                 connections=self.config.connections,
                                 what=f"point {point.id} disk {disk}")
        old = _OPEN.pop((point.id, disk), None)
        if old is not None:
            old.stop()
        _OPEN[(point.id, disk)] = server
        return NbdEndpoint(uri=server.uri, size=pd.size)

    def close(self, point: RecoveryPoint, disk: DiskId) -> None:
        server = _OPEN.pop((point.id, disk), None)
        if server is not None:
            server.stop()

    def delete(self, point: RecoveryPoint, successor: RecoveryPoint | None) -> RecoveryPoint | None:
        """Delete the point's snapshots. EBS keeps every block a child snapshot inherits,
        so the successor (and every later point) reads the same; nothing moves."""
        for pd in point.disks:
            try:
                snapshots.delete_owned(self.s, pd.location, point.protection)
            except ConnectorError as e:
                if "InvalidSnapshot.InUse" in str(e):
                    raise ConnectorError(f"point {point.id}: snapshot {pd.location} is in use by "
                                         "an image of a running test failover; retried after "
                                         "it ends") from e
                raise
        return None

    # ------------------------------------------------------------------ boot

    def _instance_type(self, spec: BootSpec) -> str:
        if self.config.instance_type:
            return self.config.instance_type
        wl = spec.workload
        cpus = spec.cpus or (wl.cpus if wl else 2)
        memory = spec.memory_mib or (wl.memory_mib if wl else 2048)
        return next((t for c, m, t in TYPES if c >= cpus and m >= memory), TYPES[-1][2])

    def _network(self, spec: BootSpec) -> tuple[str, list[str]]:
        groups = self.config.test_security_groups if spec.isolated else self.config.security_groups
        group_list = [g for g in (groups.split(",") if isinstance(groups, str) else groups) if g]
        if spec.isolated:
            if not self.config.test_subnet:
                raise PermanentError(f"platform {self.info.name!r} has no test_subnet: a test "
                                     "failover boots in an isolated subnet the operator names "
                                     "(transcend platform add … --config test_subnet=subnet-…)")
            return self.config.test_subnet, group_list
        subnet = spec.network or self.config.subnet
        if not subnet:
            raise PermanentError(f"platform {self.info.name!r}: no subnet for a failover "
                                 "instance (config subnet, or the runbook's network)")
        return subnet, group_list

    def boot(self, point: RecoveryPoint, spec: BootSpec) -> Instance:
        inv = Inventory(self.s)
        existing = inv.instances(Filters=[{"Name": f"tag:{INSTANCE_TAG}", "Values": [spec.name]}])
        if existing:
            inst = existing[0]
        else:
            subnet, groups = self._network(spec)
            image = self._image(point, spec)
            kwargs: dict[str, Any] = {
                "ImageId": image, "InstanceType": self._instance_type(spec), "MinCount": 1,
                "MaxCount": 1, "SubnetId": subnet, "ClientToken": f"{spec.name}-{point.id}"[:64],
                "TagSpecifications": [{"ResourceType": "instance", "Tags": [
                    {"Key": "Name", "Value": spec.name}, {"Key": INSTANCE_TAG, "Value": spec.name},
                    {"Key": snapshots.PROTECTION_TAG, "Value": point.protection},
                    {"Key": "transcend:image", "Value": image}]}]}
            if groups:
                kwargs["SecurityGroupIds"] = groups
            try:
                inst = self.s.ec2.run_instances(**kwargs)["Instances"][0]
            except (ClientError, BotoCoreError) as e:
                raise translate(e, f"launching {spec.name} from point {point.id}") from e
        return Instance(platform=self.info.name, id=inst["InstanceId"], name=spec.name,
                        network=inst.get("SubnetId", ""), state="running",
                        overlays=[tag(inst.get("Tags"), "transcend:image")])

    def _image(self, point: RecoveryPoint, spec: BootSpec) -> str:
        name = f"transcend-{_safe(spec.name)}-{point.id}"[:128]
        try:
            found = self.s.ec2.describe_images(Owners=["self"],
                                               Filters=[{"Name": "name", "Values": [name]}])["Images"]
            if found:
                return str(found[0]["ImageId"])
            wl = spec.workload
            mappings = [{"DeviceName": f"/dev/{pd.disk}" if not pd.disk.startswith("/") else pd.disk,
                         "Ebs": {"SnapshotId": pd.location, "DeleteOnTermination": True,
                                 "VolumeType": self.config.volume_type,
                                 "VolumeSize": volume_gib(pd.size)}} for pd in point.disks]
            image = self.s.ec2.register_image(
                Name=name, Description=f"transcend point {point.id} of {point.protection}",
                Architecture="x86_64", VirtualizationType="hvm", EnaSupport=True,
                BootMode="uefi" if wl is not None and wl.firmware == "efi" else "legacy-bios",
                RootDeviceName=mappings[0]["DeviceName"], BlockDeviceMappings=mappings)
            return str(image["ImageId"])
        except (ClientError, BotoCoreError) as e:
            raise translate(e, f"registering an image of point {point.id}") from e

    def destroy(self, instance: Instance) -> None:
        inv = Inventory(self.s)
        try:
            found = inv.instances(InstanceIds=[instance.id]) if instance.id else []
        except NotFound:
            found = []
        image = instance.overlays[0] if instance.overlays else ""
        for inst in found:
            if tag(inst.get("Tags"), INSTANCE_TAG) != instance.name:
                raise PermanentError(f"instance {inst['InstanceId']} is not a transcend instance; "
                                     "not terminating it")
            image = image or tag(inst.get("Tags"), "transcend:image")
            try:
                self.s.ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])
            except (ClientError, BotoCoreError) as e:
                raise translate(e, f"terminating {inst['InstanceId']}") from e
        if image:
            try:
                self.s.ec2.deregister_image(ImageId=image)
            except ClientError as e:
                if error_code(e) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"):
                    raise translate(e, f"deregistering image {image}") from e


    # ------------------------------------------------------------------ health

    def console_text(self, instance: Instance) -> str:
        """EC2's console output (``GetConsoleOutput``, base64; AWS keeps the latest 64 KiB)."""
        import base64

        try:
            out = self.s.ec2.get_console_output(InstanceId=instance.id, Latest=True)
        except ClientError as e:
            if error_code(e) in ("InvalidInstanceID.NotFound", "UnsupportedOperation"):
                return ""
            raise translate(e, f"reading the console of {instance.id}") from e
        text = out.get("Output") or ""
        try:
            return base64.b64decode(text).decode(errors="replace")
        except ValueError:
            return str(text)

    def agent_ready(self, instance: Instance) -> bool:
        """Both EC2 status checks pass (the instance's and the system's reachability)."""
        try:
            st = self.s.ec2.describe_instance_status(InstanceIds=[instance.id],
                                                     IncludeAllInstances=True)["InstanceStatuses"]
        except (ClientError, BotoCoreError) as e:
            raise translate(e, f"reading the status checks of {instance.id}") from e
        return bool(st) and all(st[0].get(k, {}).get("Status") == "ok"
                                for k in ("InstanceStatus", "SystemStatus"))

    def address(self, instance: Instance) -> str:
        found = Inventory(self.s).instances(InstanceIds=[instance.id])
        return str(found[0].get("PrivateIpAddress", "")) if found else ""


class AwsStaging:
    def __init__(self, target: AwsTarget, handle: StagingHandle) -> None:
        self.target = target
        self.handle = handle
        self._servers: list[SocketServer] = []

    def _info(self, disk: DiskId) -> tuple[DiskInfo, dict[str, str]]:
        for d in self.handle.disks:
            if d.id == disk:
                return d, self.handle.data["disks"][disk]
        raise PermanentError(f"disk {disk!r} is not part of this staging")

    def endpoint(self, disk: DiskId) -> NbdEndpoint:
        d, info = self._info(disk)
        snap = snapshots.describe(self.target.s, info["snapshot"])
        if snap is None or snap["State"] != "pending":
            raise PermanentError(f"the staged snapshot {info['snapshot']} of disk {disk} is "
                                 f"{snap['State'] if snap else 'gone'}: abort the cycle")
        server = serve_block_api(WRITER, {**self.target.s.params, "snapshot": info["snapshot"],
                                          "parent": info["parent"], "size": d.size,
                                          "journal": info["journal"]},
                                 writable=True, what=f"staged snapshot of disk {disk}",
                                 connections=self.target.config.connections)
        self._servers.append(server)
        return NbdEndpoint(uri=server.uri, size=d.size, writable=True)

    def close(self) -> None:
        for s in self._servers:
            s.stop()
        self._servers.clear()

    def commit(self, meta: PointMeta) -> list[str]:
        """CompleteSnapshot of every disk with what its journal says was written (a disk
        already completed by an earlier attempt is left alone), then wait for
        ``completed``. Locations are the snapshot ids."""
        self.close()
        s = self.target.s
        ids = []
        for d in self.handle.disks:
            info = self.handle.data["disks"][d.id]
            ids.append(info["snapshot"])
            snap = snapshots.describe(s, info["snapshot"])
            if snap is None:
                raise PermanentError(f"the staged snapshot {info['snapshot']} of disk {d.id} is "
                                     "gone: the cycle cannot commit; it is aborted and redone")
            if snap["State"] != "pending":
                continue
            if not Path(info["journal"]).exists():
                raise PermanentError(f"the journal of staged snapshot {info['snapshot']} "
                                     f"({info['journal']}) is missing on this worker: the blocks "
                                     "written cannot be counted; the cycle is aborted and redone")
            written = ebs_blocks.read_journal(info["journal"])
            kwargs: dict[str, Any] = {"SnapshotId": info["snapshot"],
                                      "ChangedBlocksCount": len(written)}
            if written:
                kwargs.update(Checksum=ebs_blocks.aggregate_checksum(written),
                              ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
            try:
                s.ebs.complete_snapshot(**kwargs)
            except (ClientError, BotoCoreError) as e:
                raise translate(e, f"completing the snapshot of disk {d.id}") from e
        snapshots.wait_completed(s, ids, f"point {meta.cycle_id} of {self.handle.protection}")
        self._remove_journals()
        return ids

    def abort(self) -> None:
        """Delete the pending snapshots (earlier points are untouched)."""
        self.close()
        for d in self.handle.disks:
            info = self.handle.data["disks"][d.id]
            snap = snapshots.describe(self.target.s, info["snapshot"])
            if snap is not None and snap["State"] == "completed":
                raise PermanentError(f"cycle {self.handle.cycle_id} is committed; delete its point")
            snapshots.delete_owned(self.target.s, info["snapshot"], self.handle.protection)
        self._remove_journals()

    def _remove_journals(self) -> None:
        for info in self.handle.data["disks"].values():
            Path(info["journal"]).unlink(missing_ok=True)
            Path(ebs_blocks.shadow_path(info["journal"])).unlink(missing_ok=True)

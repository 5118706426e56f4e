"""EC2 instances as transcend workloads: volumes, type, boot mode, networks, state."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from connectors.aws.session import AwsSession, translate
from connectors.base import NotFound
from transcend.models import DiskInfo, NicInfo, Workload, WorkloadRef

GIB = 1 << 30
#: EC2 instance states as PowerControl reports them ("stopping" still runs the guest).
POWER = {"pending": "running", "running": "running", "stopping": "running",
         "stopped": "shutoff", "shutting-down": "shutoff", "terminated": "shutoff"}


def tag(tags: list[dict[str, str]] | None, key: str) -> str:
    return next((t["Value"] for t in tags or [] if t.get("Key") == key), "")


def disk_id(device_name: str) -> str:
    """``/dev/xvda`` -> ``xvda``, ``/dev/sda1`` -> ``sda1``."""
    return device_name.removeprefix("/dev/")


class Inventory:
    def __init__(self, session: AwsSession) -> None:
        self.s = session
        self._types: dict[str, tuple[int, int]] = {}

    def instances(self, **filters: Any) -> list[dict[str, Any]]:
        try:
            return [i for page in self.s.ec2.get_paginator("describe_instances").paginate(**filters)
                    for r in page["Reservations"] for i in r["Instances"]
                    if i["State"]["Name"] != "terminated"]
        except (ClientError, BotoCoreError) as e:
            raise translate(e, f"listing EC2 instances in {self.s.region}") from e

    def instance(self, ref_or_name: str) -> dict[str, Any]:
        """By instance id or Name tag (a name must be unique among live instances)."""
        if ref_or_name.startswith("i-"):
            try:
                found = self.instances(InstanceIds=[ref_or_name])
            except NotFound:
                found = []
        else:
            found = self.instances(Filters=[{"Name": "tag:Name", "Values": [ref_or_name]}])
        if not found:
            raise NotFound(f"no EC2 instance {ref_or_name!r} in {self.s.region} (by instance "
                           "id or Name tag); `transcend workloads` lists them")
        if len(found) > 1:
            raise NotFound(f"{len(found)} EC2 instances are named {ref_or_name!r} in "
                           f"{self.s.region}: use the instance id")
        return found[0]

    def _type(self, instance_type: str) -> tuple[int, int]:
        if instance_type not in self._types:
            try:
                info = self.s.ec2.describe_instance_types(InstanceTypes=[instance_type])
                t = info["InstanceTypes"][0]
                self._types[instance_type] = (int(t["VCpuInfo"]["DefaultVCpus"]),
                                              int(t["MemoryInfo"]["SizeInMiB"]))
            except (ClientError, BotoCoreError, KeyError, IndexError):
                self._types[instance_type] = (1, 1024)
        return self._types[instance_type]

    def volumes(self, instance: dict[str, Any]) -> dict[str, dict[str, Any]]:
        ids = [m["Ebs"]["VolumeId"] for m in instance.get("BlockDeviceMappings", []) if "Ebs" in m]
        if not ids:
            return {}
        try:
            vols = self.s.ec2.describe_volumes(VolumeIds=ids)["Volumes"]
        except (ClientError, BotoCoreError) as e:
            raise translate(e, f"describing the volumes of {instance['InstanceId']}") from e
        return {v["VolumeId"]: v for v in vols}

    def workload(self, instance: dict[str, Any], platform: str) -> Workload:
        vols = self.volumes(instance)
        root = instance.get("RootDeviceName", "")
        disks = []
        for m in instance.get("BlockDeviceMappings", []):
            if "Ebs" not in m or m["Ebs"]["VolumeId"] not in vols:
                continue
            v = vols[m["Ebs"]["VolumeId"]]
            disks.append(DiskInfo(
                id=disk_id(m["DeviceName"]), size=int(v["Size"]) * GIB, name=m["DeviceName"],
                bus="nvme", boot_order=1 if m["DeviceName"] == root else None,
                source=v["VolumeId"],
                controller=f"{v.get('VolumeType', '')}{',encrypted' if v.get('Encrypted') else ''}"))
        cpus, memory = self._type(instance.get("InstanceType", ""))
        nics = [NicInfo(mac=n.get("MacAddress", ""), network=n.get("SubnetId", ""), model="ena")
                for n in instance.get("NetworkInterfaces", [])]
        name = tag(instance.get("Tags"), "Name") or instance["InstanceId"]
        boot = instance.get("BootMode", "") or instance.get("CurrentInstanceBootMode", "")
        return Workload(
            ref=WorkloadRef(platform=platform, id=instance["InstanceId"]), name=name,
            cpus=max(1, cpus), memory_mib=max(1, memory),
            firmware="efi" if boot.startswith("uefi") else "bios",
            machine=f"{instance.get('InstanceType', '')}/{instance.get('Architecture', 'x86_64')}",
            disks=disks, nics=nics,
            os_family="windows" if instance.get("Platform") == "windows" else "linux",
            power_state=POWER.get(instance["State"]["Name"], "unknown"),
            guest_os=instance.get("PlatformDetails", ""))

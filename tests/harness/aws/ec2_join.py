"""Joins moto's EC2 backend (same process) to the EBS model and to real volume files.

- Volumes are sparse files ``<data>/volumes/<vol-id>.img`` of their size, made when moto
  makes the volume (CreateVolume, RunInstances) and removed when moto deletes it
  (DeleteVolume, TerminateInstances with DeleteOnTermination); a volume made from a
  snapshot gets the snapshot's content (read through its lineage).
- CreateSnapshot / CreateSnapshots / CopySnapshot capture content into the model at that
  instant; DeleteSnapshot drops it. Snapshots started through EBS StartSnapshot are added
  to moto's backend, so DescribeSnapshots, DeleteSnapshot, tags and RegisterImage see them.
- RegisterImage's BlockDeviceMappings (ignored by moto) are recorded; RunInstances of such
  an image gets one volume per mapping, made from the mapped snapshot.

moto is patched at class level (only inside the simulator's child process).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moto.ec2.models import ec2_backends
from moto.ec2.models.amis import Ami
from moto.ec2.models.elastic_block_store import EBSBackend, Snapshot, Volume

from tests.harness.aws.ebs_model import COMPLETED, EbsModel, Snap

EBS_VOLUME_ID = "vol-ffffffff"  # what AWS reports for snapshots not taken from a volume
GIB = 1 << 30


class Ec2Error(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


Pairs = list[tuple[str, str]]


def _bdm(pairs: Pairs) -> list[dict[str, str]]:
    """BlockDeviceMapping.N.* of an EC2 query request, in N order, keys without the prefix."""
    by_n: dict[int, dict[str, str]] = {}
    for k, v in pairs:
        m = re.match(r"^BlockDeviceMapping\.(\d+)\.(.+)$", k)
        if m:
            by_n.setdefault(int(m.group(1)), {})[m.group(2)] = v
    return [by_n[n] for n in sorted(by_n)]


def _tag_specs(pairs: Pairs, resource_type: str) -> dict[str, str]:
    specs: dict[int, dict[str, Any]] = {}
    for k, v in pairs:
        m = re.match(r"^TagSpecification\.(\d+)\.(ResourceType|Tag\.(\d+)\.(Key|Value))$", k)
        if not m:
            continue
        spec = specs.setdefault(int(m.group(1)), {"tags": {}})
        if m.group(2) == "ResourceType":
            spec["type"] = v
        else:
            spec["tags"].setdefault(int(m.group(3)), {})[m.group(4)] = v
    out: dict[str, str] = {}
    for spec in specs.values():
        if spec.get("type") == resource_type:
            for t in spec["tags"].values():
                out[t.get("Key", "")] = t.get("Value", "")
    return out


def _tags(resource: Any) -> dict[str, str]:
    return {t["key"]: t["value"] for t in resource.get_tags()}


def _true(v: str | None, default: bool) -> bool:
    return default if v is None else v.lower() == "true"


class Ec2Join:
    def __init__(self, model: EbsModel, data_dir: Path, account: str, region: str) -> None:
        self.model = model
        self.volumes_dir = data_dir / "volumes"
        self.volumes_dir.mkdir(parents=True, exist_ok=True)
        self.account = account
        self.region = region
        self.images: dict[str, list[dict[str, str]]] = {}  # ami id -> recorded mappings
        self.baseline: set[str] = set()
        self.quota: Callable[[str], bool] = lambda op: False
        model.listener = self

    @property
    def backend(self) -> Any:
        return ec2_backends[self.account][self.region]

    def volume_path(self, volume_id: str) -> Path:
        return self.volumes_dir / f"{volume_id}.img"

    # ------------------------------------------------------------------ moto patches

    def install(self) -> None:
        join = self
        orig_create_volume = EBSBackend.create_volume
        orig_delete_volume = EBSBackend.delete_volume
        orig_create_snapshot = EBSBackend.create_snapshot
        orig_delete_snapshot = EBSBackend.delete_snapshot
        orig_copy_snapshot = EBSBackend.copy_snapshot
        orig_bdm = Ami.block_device_mappings.fget  # type: ignore[attr-defined]

        def create_volume(self: Any, *args: Any, **kwargs: Any) -> Any:
            volume = orig_create_volume(self, *args, **kwargs)
            join.volume_created(volume)
            return volume

        def delete_volume(self: Any, volume_id: str) -> Any:
            volume = orig_delete_volume(self, volume_id)
            join.volume_path(volume_id).unlink(missing_ok=True)
            return volume

        def create_snapshot(self: Any, volume_id: str, description: str,
                            owner_id: str | None = None, from_ami: str | None = None) -> Any:
            snapshot = orig_create_snapshot(self, volume_id, description, owner_id, from_ami)
            join.ec2_snapshot_created(snapshot, from_ami)
            return snapshot

        def delete_snapshot(self: Any, snapshot_id: str) -> Any:
            snapshot = orig_delete_snapshot(self, snapshot_id)
            join.model.drop(snapshot_id)
            return snapshot

        def copy_snapshot(self: Any, *args: Any, **kwargs: Any) -> Any:
            snapshot = orig_copy_snapshot(self, *args, **kwargs)
            source = kwargs.get("source_snapshot_id") or args[0]
            if join.model.copy_snapshot(source, snapshot.id) is not None:
                snapshot.status = "pending"
            return snapshot

        def block_device_mappings(self: Any) -> Any:
            if self.id in join.images:
                return join.describe_mappings(self.id)
            return orig_bdm(self)

        EBSBackend.create_volume = create_volume  # type: ignore[method-assign]
        EBSBackend.delete_volume = delete_volume  # type: ignore[method-assign]
        EBSBackend.create_snapshot = create_snapshot  # type: ignore[method-assign]
        EBSBackend.delete_snapshot = delete_snapshot  # type: ignore[method-assign]
        EBSBackend.copy_snapshot = copy_snapshot  # type: ignore[method-assign]
        # CreateSnapshots' SnapshotInfo reads "state"; progress follows the state
        Snapshot.state = property(lambda s: s.status)  # type: ignore[attr-defined]
        Snapshot.progress = property(  # type: ignore[method-assign,assignment]
            lambda s: "100%" if s.status == COMPLETED else "0%")
        Ami.block_device_mappings = property(block_device_mappings)  # type: ignore[method-assign,assignment]

    def warm_up(self) -> None:
        """Create the backend now (it loads the AMIs) and remember what exists before tests."""
        b = self.backend
        for ami in b.amis.values():  # moto's "auto-created" snapshots of the base image(s)
            auto = getattr(ami, "ebs_snapshot", None)
            if auto is not None:
                b.snapshots.pop(auto.id, None)
                self.model.drop(auto.id)
        self.baseline = set(b.snapshots) | set(b.amis) | set(b.volumes)

    # ------------------------------------------------------------------ volumes

    def volume_created(self, volume: Any) -> None:
        path = self.volume_path(volume.id)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, int(volume.size) * GIB)
        finally:
            os.close(fd)
        if volume.snapshot_id:
            self.model.fill_volume(volume.snapshot_id, path)

    # ------------------------------------------------------------------ snapshots

    def ec2_snapshot_created(self, snapshot: Any, from_ami: str | None) -> None:
        volume = snapshot.volume
        path = self.volume_path(volume.id)
        self.model.capture_volume(
            snapshot.id, volume_id=volume.id, size_gib=int(volume.size),
            path=path if path.exists() else None, source_snapshot=volume.snapshot_id,
            description=snapshot.description or "", encrypted=bool(snapshot.encrypted),
            settled=from_ami is not None)
        if from_ami is None:
            snapshot.status = "pending"  # completed once DescribeSnapshots looks again

    # Listener (EBS model -> moto)
    def snapshot_started(self, snap: Snap) -> None:
        b = self.backend
        volume = Volume(b, EBS_VOLUME_ID, snap.volume_size, None)  # type: ignore[abstract]
        moto_snap = Snapshot(b, snap.id, volume, snap.description, encrypted=snap.encrypted,
                             kms_key_id=snap.kms_key_arn)
        moto_snap.status = snap.visible_state
        if snap.tags:
            moto_snap.add_tags({t["Key"]: t["Value"] for t in snap.tags})
        b.snapshots[snap.id] = moto_snap

    def state_changed(self, snap: Snap) -> None:
        moto_snap = self.backend.snapshots.get(snap.id)
        if moto_snap is None:
            return
        moto_snap.status = snap.visible_state
        if snap.message:
            moto_snap.state_message = snap.message
        elif hasattr(moto_snap, "state_message"):
            del moto_snap.state_message

    # ------------------------------------------------------------------ request hooks

    def _snapshot_size(self, snapshot_id: str) -> int:
        s = self.backend.snapshots.get(snapshot_id)
        if s is None:
            raise Ec2Error("InvalidSnapshot.NotFound", f"The snapshot '{snapshot_id}' does not exist.")
        return int(s.volume.size)

    def _check_size(self, snapshot_id: str, size: str | None) -> None:
        need = self._snapshot_size(snapshot_id)
        if size is not None and int(size) < need:
            raise Ec2Error("InvalidParameterValue", f"Volume of {size}GiB is smaller than snapshot "
                           f"'{snapshot_id}', expect size >= {need}GiB")

    def before(self, action: str, pairs: Pairs) -> Pairs:
        """Runs before moto handles ``action``; may rewrite the request or raise Ec2Error."""
        self.model.sweep()
        if action == "DescribeSnapshots":
            self.model.settle()
        elif action in ("CreateSnapshot", "CreateSnapshots") and self.quota(action):
            raise Ec2Error("SnapshotLimitExceeded", "The maximum number of snapshots has been "
                           "reached.")
        elif action == "CreateVolume":
            params = dict(pairs)
            if params.get("SnapshotId"):
                self._check_size(params["SnapshotId"], params.get("Size"))
        elif action == "RegisterImage":
            for m in _bdm(pairs):
                if m.get("Ebs.SnapshotId"):
                    self._check_size(m["Ebs.SnapshotId"], m.get("Ebs.VolumeSize"))
        elif action == "RunInstances":
            return self._run_instances(pairs)
        return pairs

    def _run_instances(self, pairs: Pairs) -> Pairs:
        params = dict(pairs)
        merged: dict[str, dict[str, str]] = {}
        for m in self.images.get(params.get("ImageId", ""), []):
            merged[m["DeviceName"]] = dict(m)
        for m in _bdm(pairs):
            dev = m.get("DeviceName", "")
            if "NoDevice" in m:
                merged.pop(dev, None)
                continue
            merged.setdefault(dev, {}).update(m)
        if not merged:
            return pairs
        out = [(k, v) for k, v in pairs if not k.startswith("BlockDeviceMapping.")]
        for n, m in enumerate(merged.values(), start=1):
            if any(k.startswith("Ebs.") for k in m):
                m.setdefault("Ebs.DeleteOnTermination", "true")  # EbsBlockDevice default
            if m.get("Ebs.SnapshotId"):
                self._check_size(m["Ebs.SnapshotId"], m.get("Ebs.VolumeSize"))
            out.extend((f"BlockDeviceMapping.{n}.{k}", v) for k, v in m.items())
        return out

    def after(self, action: str, pairs: Pairs, status: int, body: bytes) -> None:
        if status != 200:
            return
        if action == "RegisterImage":
            m = re.search(rb"<imageId>(ami-[0-9a-z]+)</imageId>", body)
            if m:
                self._registered(m.group(1).decode(), pairs)
        elif action == "DeregisterImage":
            image_id = dict(pairs).get("ImageId", "")
            self.images.pop(image_id, None)
            for s in self.backend.snapshots.values():
                if s.from_ami == image_id:
                    s.from_ami = None

    def _registered(self, image_id: str, pairs: Pairs) -> None:
        b = self.backend
        ami = b.amis.get(image_id)
        if ami is None:
            return
        params = dict(pairs)
        mappings = [m for m in _bdm(pairs) if "NoDevice" not in m]
        self.images[image_id] = mappings
        # moto made an "auto-created" 15 GiB snapshot for the image; RegisterImage does not
        auto = getattr(ami, "ebs_snapshot", None)
        if auto is not None:
            b.snapshots.pop(auto.id, None)
            self.model.drop(auto.id)
        for m in mappings:
            s = b.snapshots.get(m.get("Ebs.SnapshotId", ""))
            if s is not None:
                s.from_ami = image_id  # DeleteSnapshot: InvalidSnapshot.InUse while registered
        ami.root_device_type = "ebs"
        ami.root_device_name = params.get("RootDeviceName") or \
            (mappings[0]["DeviceName"] if mappings else ami.root_device_name)
        ami.virtualization_type = params.get("VirtualizationType") or "hvm"
        ami.architecture = params.get("Architecture") or "x86_64"
        if params.get("BootMode"):
            ami.boot_mode = params["BootMode"]
        if "EnaSupport" in params:
            ami.ena_support = _true(params["EnaSupport"], False)
        if params.get("SriovNetSupport"):
            ami.sriov = params["SriovNetSupport"]
        tags = _tag_specs(pairs, "image")
        if tags:
            ami.add_tags(tags)

    def describe_mappings(self, image_id: str) -> list[dict[str, Any]]:
        out = []
        for m in self.images.get(image_id, []):
            ebs: dict[str, Any] = {}
            snap_id = m.get("Ebs.SnapshotId")
            if snap_id:
                ebs["SnapshotId"] = snap_id
                size = m.get("Ebs.VolumeSize")
                if size is None:
                    s = self.backend.snapshots.get(snap_id)
                    size = str(s.volume.size) if s is not None else None
                if size is not None:
                    ebs["VolumeSize"] = int(size)
            elif m.get("Ebs.VolumeSize"):
                ebs["VolumeSize"] = int(m["Ebs.VolumeSize"])
            ebs["DeleteOnTermination"] = _true(m.get("Ebs.DeleteOnTermination"), True)
            ebs["VolumeType"] = m.get("Ebs.VolumeType", "gp2")
            ebs["Encrypted"] = _true(m.get("Ebs.Encrypted"), False)
            out.append({"DeviceName": m.get("DeviceName"), "Ebs": ebs})
        return out

    # ------------------------------------------------------------------ admin views

    def volume_info(self, volume_id: str) -> dict[str, Any] | None:
        v = self.backend.volumes.get(volume_id)
        if v is None:
            return None
        path = self.volume_path(volume_id)
        return {"path": str(path), "size": int(v.size) * GIB, "size_gib": int(v.size),
                "snapshot_id": v.snapshot_id, "exists": path.exists()}

    def resources(self) -> dict[str, Any]:
        b = self.backend
        skip = self.baseline
        snaps = []
        for s in b.snapshots.values():
            if s.id in skip:
                continue
            ms = self.model.get(s.id)
            snaps.append({"id": s.id, "state": s.status, "tags": _tags(s),
                          "volume_id": s.volume.id, "origin": ms.origin if ms else None})
        images = [{"id": a.id, "state": a.state, "name": a.name, "tags": _tags(a),
                   "snapshots": [m.get("Ebs.SnapshotId") for m in self.images.get(a.id, [])]}
                  for a in b.amis.values() if a.id not in skip]
        instances = []
        for inst in b.all_instances():
            instances.append({"id": inst.id, "state": inst.state, "tags": _tags(inst),
                              "image_id": inst.image_id,
                              "volumes": {d: bd.volume_id for d, bd in inst.get_block_device_mapping}})
        volumes = []
        for v in b.volumes.values():
            if v.id in skip:
                continue
            att = v.attachment
            volumes.append({"id": v.id, "size_gib": int(v.size), "state": v.status,
                            "snapshot_id": v.snapshot_id, "tags": _tags(v),
                            "instance_id": att.instance.id if att else None,
                            "device": att.device if att else None,
                            "path": str(self.volume_path(v.id))})
        files = sorted(p.name[:-4] for p in self.volumes_dir.glob("*.img") if p.name[:-4] not in skip)
        return {"snapshots": snaps, "images": images, "instances": instances, "volumes": volumes,
                "volume_files": files, "blobs": self.model.blobs.count()}

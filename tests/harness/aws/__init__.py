"""A local AWS double for the AWS connector: moto's EC2 and STS plus a model of the EBS
direct APIs, on one endpoint, reached only through boto3 with ``endpoint_url``::

    from tests.harness.aws import aws_sim

    with aws_sim(tmp_path) as sim:            # starts the child, waits ready, kills on exit
        ec2, ebs = sim.client("ec2"), sim.client("ebs")
        inst = sim.make_instance("vm1", volume_gib=[1, 1])
        vol = sim.volume_ids(inst)[0]
        sim.write(vol, 0, b"boot")              # as the guest would
        snap = ec2.create_snapshots(InstanceSpecification={"InstanceId": inst})
        sim.fault("throttle", 3, api="GetSnapshotBlock")

The simulator runs as a child process in its own session (``python -m
tests.harness.aws.server``) and is stopped with SIGTERM, then SIGKILL, when the ``with``
block ends, also on failure. See tests/harness/aws/README.md for the model, its rules and
where each comes from.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

__all__ = ["BLOCK_SIZE", "AwsSim", "aws_sim"]

BLOCK_SIZE = 524288
READY_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[3]
DEFAULT_ACCESS_KEY = "AKIATRANSCENDTEST01"
DEFAULT_SECRET_KEY = "transcend-test-secret-key-0123456789abcdef"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AwsSim:
    """A running simulator. ``endpoint`` serves EC2, STS and EBS direct alike."""

    endpoint: str
    region: str
    access_key: str
    secret_key: str
    account: str
    base_ami: str
    dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)
    _clients: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- clients

    def client(self, service: str, *, access_key: str | None = None, secret_key: str | None = None,
               max_attempts: int = 5, **config: Any) -> Any:
        """A boto3 client for ``service`` pointed at the simulator (standard retry mode,
        ``max_attempts`` attempts in all; extra keywords go to botocore's Config). Clients
        are cached per argument set."""
        key = (service, access_key, secret_key, max_attempts, tuple(sorted(config.items())))
        cached = self._clients.get(key)
        if cached is not None:
            return cached
        import boto3
        from botocore.config import Config

        cfg = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                     connect_timeout=10, read_timeout=60, **config)
        client = boto3.session.Session().client(
            service, endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, config=cfg)
        self._clients[key] = client
        return client

    # ---------------------------------------------------------------- admin API

    def _admin(self, method: str, what: str, body: dict[str, Any] | None = None) -> Any:
        r = requests.request(method, f"{self.endpoint}/_model/{what}", json=body, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"aws sim admin {method} {what}: {r.status_code} {r.text.strip()}")
        return r.json()

    def fault(self, kind: str, count: int = 1, api: str | None = None) -> None:
        """The next ``count`` matching requests fail: ``throttle`` (ThrottlingException),
        ``throttle_request`` (RequestThrottledException), ``500``, ``503`` for EBS operations
        (or the EC2 action named by ``api``); ``corrupt`` damages GetSnapshotBlock data;
        ``quota`` fails StartSnapshot / CreateSnapshot(s) as at the snapshot limit."""
        body: dict[str, Any] = {"kind": kind, "count": count}
        if api is not None:
            body["api"] = api
        self._admin("POST", "faults", body)

    def clear_faults(self) -> None:
        self._admin("DELETE", "faults")

    def empty_pages(self, count: int) -> None:
        """The next ``count`` list calls answer an empty page that still has a NextToken."""
        self._admin("POST", "empty_pages", {"count": count})

    def advance_clock(self, seconds: float) -> float:
        """Move the model clock (token expiry, StartSnapshot Timeout); returns its time."""
        return float(self._admin("POST", "clock", {"advance_seconds": seconds})["now"])

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("GET", "stats")
        return result

    def reset_stats(self) -> None:
        self._admin("POST", "stats/reset")

    def resources(self) -> dict[str, Any]:
        """Snapshots, images, instances, volumes made since the simulator started."""
        result: dict[str, Any] = self._admin("GET", "resources")
        return result

    def model_snapshot(self, snap_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("GET", f"snapshot/{snap_id}")
        return result

    # ---------------------------------------------------------------- instances and volumes

    def make_instance(self, name: str, volume_gib: list[int] | tuple[int, ...] = (1,),
                      instance_type: str = "t3.small") -> str:
        """A running instance with one volume per size, attached as /dev/xvda, /dev/xvdb, ..."""
        ec2 = self.client("ec2")
        mappings = [{"DeviceName": f"/dev/xvd{chr(ord('a') + i)}",
                     "Ebs": {"VolumeSize": size, "VolumeType": "gp3", "DeleteOnTermination": True}}
                    for i, size in enumerate(volume_gib)]
        r = ec2.run_instances(
            ImageId=self.base_ami, MinCount=1, MaxCount=1, InstanceType=instance_type,
            BlockDeviceMappings=mappings,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]},
                               {"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": name}]}])
        instance_id: str = r["Instances"][0]["InstanceId"]
        return instance_id

    def volume_ids(self, instance_id: str) -> list[str]:
        """The instance's volumes in device-name order."""
        r = self.client("ec2").describe_instances(InstanceIds=[instance_id])
        inst = r["Reservations"][0]["Instances"][0]
        maps = sorted(inst.get("BlockDeviceMappings", []), key=lambda m: m["DeviceName"])
        return [m["Ebs"]["VolumeId"] for m in maps]

    def volume_path(self, volume_id: str) -> Path:
        return Path(self._admin("GET", f"volume/{volume_id}")["path"])

    def write(self, volume_id: str, offset: int, data: bytes) -> None:
        """Write into the volume's file as the guest would (pwrite + fsync)."""
        fd = os.open(self.volume_path(volume_id), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, volume_id: str, offset: int, length: int) -> bytes:
        fd = os.open(self.volume_path(volume_id), os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- snapshots

    def wait_snapshot(self, snap_id: str, state: str = "completed", timeout: float = 10.0) -> str:
        """Poll DescribeSnapshots until the snapshot is ``state`` (or error); returns the state."""
        ec2 = self.client("ec2")
        deadline = time.monotonic() + timeout
        while True:
            got: str = ec2.describe_snapshots(SnapshotIds=[snap_id])["Snapshots"][0]["State"]
            if got == state or got == "error" or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def snapshot_blocks(self, snap_id: str) -> dict[int, bytes]:
        """Every block of the snapshot, read through boto3 ``ebs`` (ListSnapshotBlocks +
        GetSnapshotBlock), each checked against its x-amz-Checksum."""
        import base64
        import hashlib

        state = self.wait_snapshot(snap_id)
        if state != "completed":
            raise RuntimeError(f"snapshot {snap_id} is {state}, not completed")
        ebs = self.client("ebs")
        out: dict[int, bytes] = {}
        kwargs: dict[str, Any] = {"SnapshotId": snap_id, "MaxResults": 10000}
        while True:
            page = ebs.list_snapshot_blocks(**kwargs)
            for b in page["Blocks"]:
                r = ebs.get_snapshot_block(SnapshotId=snap_id, BlockIndex=b["BlockIndex"],
                                           BlockToken=b["BlockToken"])
                data = r["BlockData"].read()
                if base64.b64encode(hashlib.sha256(data).digest()).decode() != r["Checksum"]:
                    raise RuntimeError(f"block {b['BlockIndex']} of {snap_id}: checksum mismatch")
                out[b["BlockIndex"]] = data
            if not page.get("NextToken"):
                return out
            kwargs["NextToken"] = page["NextToken"]

    def read_snapshot(self, snap_id: str, length: int | None = None) -> bytes:
        """The snapshot's content read back through boto3 ``ebs``, from offset 0 to the end
        of its last block (holes read as zeros), or exactly ``length`` bytes. Only the
        written extent is materialised: use small ``length`` values on big volumes."""
        blocks = self.snapshot_blocks(snap_id)
        end = (max(blocks) + 1) * BLOCK_SIZE if blocks else 0
        size = end if length is None else length
        buf = bytearray(size)
        for index, data in blocks.items():
            off = index * BLOCK_SIZE
            if off < size:
                buf[off: off + BLOCK_SIZE] = data[: size - off]
        return bytes(buf)

    # ---------------------------------------------------------------- lifecycle

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        _stop(self.proc, grace)


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def aws_sim(workdir: Path, *, access_key: str = DEFAULT_ACCESS_KEY,
            secret_key: str = DEFAULT_SECRET_KEY, region: str = "us-east-1") -> Iterator[AwsSim]:
    """Start the simulator with its data in ``workdir/aws``; stop it on exit."""
    data = Path(workdir) / "aws"
    data.mkdir(parents=True, exist_ok=True)
    ready = data / "ready.json"
    ready.unlink(missing_ok=True)
    log_path = data / "aws-sim.log"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.aws.server", "--port", str(port),
             "--data", str(data), "--access-key", access_key, "--secret-key", secret_key,
             "--region", region],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    sim: AwsSim | None = None
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the AWS simulator exited with {proc.returncode} before it "
                                   f"was ready; log: {log_path}\n{tail}")
            if time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the AWS simulator was not ready after {READY_TIMEOUT:.0f}s; "
                                   f"log: {log_path}\n{tail}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        sim = AwsSim(endpoint=f"http://{info['host']}:{info['port']}", region=region,
                     access_key=access_key, secret_key=secret_key, account=info["account"],
                     base_ami=info["base_ami"], dir=data, log_path=log_path, proc=proc)
        yield sim
    except BaseException:
        if sim is not None:
            print(f"--- AWS simulator log tail ({log_path}) ---\n{sim.log_tail()}", file=sys.stderr)
        raise
    finally:
        _stop(proc)

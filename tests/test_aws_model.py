"""The AWS double (tests/harness/aws): each EBS direct / EC2 rule it enforces, proved
through boto3 against the running simulator. See tests/harness/aws/README.md."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.harness.aws import BLOCK_SIZE, AwsSim, aws_sim

GIB = 1 << 30
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsSim]:
    with aws_sim(tmp_path_factory.mktemp("awsmodel")) as s:
        yield s


@pytest.fixture(autouse=True)
def _clean(sim: AwsSim) -> Iterator[None]:
    sim.clear_faults()
    sim.empty_pages(0)
    sim.reset_stats()
    yield
    sim.clear_faults()
    sim.empty_pages(0)


def b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def block(fill: int | bytes) -> bytes:
    if isinstance(fill, int):
        return bytes([fill]) * BLOCK_SIZE
    return fill + bytes(BLOCK_SIZE - len(fill))


def code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def put(ebs: Any, snap: str, index: int, data: bytes) -> None:
    ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=index, BlockData=data,
                           DataLength=len(data), Checksum=b64(data), ChecksumAlgorithm="SHA256")


def linear(blocks: dict[int, bytes]) -> str:
    h = hashlib.sha256()
    for i in sorted(blocks):
        h.update(hashlib.sha256(blocks[i]).digest())
    return base64.b64encode(h.digest()).decode()


def ebs_snapshot(sim: AwsSim, blocks: dict[int, bytes], *, parent: str | None = None,
                 size: int = 1, tags: dict[str, str] | None = None) -> str:
    """StartSnapshot, PutSnapshotBlock each block, CompleteSnapshot with the LINEAR checksum,
    wait for completed."""
    ebs = sim.client("ebs")
    kw: dict[str, Any] = {"VolumeSize": size, "Timeout": 60}
    if parent:
        kw["ParentSnapshotId"] = parent
    if tags:
        kw["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
    snap: str = ebs.start_snapshot(**kw)["SnapshotId"]
    for i, d in blocks.items():
        put(ebs, snap, i, d)
    r = ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=len(blocks),
                              Checksum=linear(blocks), ChecksumAlgorithm="SHA256",
                              ChecksumAggregationMethod="LINEAR")
    assert r["Status"] == "pending"  # sealing is asynchronous (writesnapshots)
    assert sim.wait_snapshot(snap) == "completed"
    return snap


def ec2_snapshots(sim: AwsSim, instance: str) -> list[str]:
    r = sim.client("ec2").create_snapshots(InstanceSpecification={"InstanceId": instance})
    ids = [s["SnapshotId"] for s in r["Snapshots"]]
    for s in ids:
        assert sim.wait_snapshot(s) == "completed"
    return ids


def punch_hole(path: Path, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros and is unallocated."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_WRONLY)
    try:
        if libc.fallocate(fd, 0x02 | 0x01, offset, length) != 0:
            raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)")
    finally:
        os.close(fd)


def all_changed(ebs: Any, **kw: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = ebs.list_changed_blocks(**kw)
        out += page["ChangedBlocks"]
        if not page.get("NextToken"):
            return out
        kw["NextToken"] = page["NextToken"]


# --------------------------------------------------------------------------- credentials


def test_bad_credentials_are_refused_with_the_sdk_errors(sim: AwsSim) -> None:
    assert sim.client("sts").get_caller_identity()["Account"] == sim.account
    wrong: list[dict[str, Any]] = [{"access_key": "AKIAWRONGKEY0000000"}, {"secret_key": "wrong"}]
    for kw in wrong:
        with pytest.raises(ClientError) as e:
            sim.client("ec2", **kw).describe_instances()
        assert code(e) == "AuthFailure"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401
        with pytest.raises(ClientError) as e:
            sim.client("ebs", **kw).start_snapshot(VolumeSize=1)
        assert code(e) == "AccessDeniedException"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(ClientError) as e:
            sim.client("sts", **kw).get_caller_identity()
        assert code(e) in ("InvalidClientTokenId", "SignatureDoesNotMatch")
    # a client for another region is refused too (credential scope)
    import boto3

    other = boto3.client("ec2", endpoint_url=sim.endpoint, region_name="eu-west-1",
                         aws_access_key_id=sim.access_key, aws_secret_access_key=sim.secret_key)
    with pytest.raises(ClientError) as e:
        other.describe_instances()
    assert code(e) == "AuthFailure"
    assert sim.stats()["auth_failures"] == 7


def test_assumed_role_credentials_from_sts_are_accepted(sim: AwsSim) -> None:
    creds = sim.client("sts").assume_role(
        RoleArn=f"arn:aws:iam::{sim.account}:role/transcend", RoleSessionName="transcend-test")["Credentials"]
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=sim.endpoint, region_name=sim.region,
                       aws_access_key_id=creds["AccessKeyId"],
                       aws_secret_access_key=creds["SecretAccessKey"],
                       aws_session_token=creds["SessionToken"])
    ec2.describe_instances()
    bad = boto3.client("ec2", endpoint_url=sim.endpoint, region_name=sim.region,
                       aws_access_key_id=creds["AccessKeyId"],
                       aws_secret_access_key=creds["SecretAccessKey"], aws_session_token="nope")
    with pytest.raises(ClientError) as e:
        bad.describe_instances()
    assert code(e) == "AuthFailure"


# --------------------------------------------------------------------------- volumes


def test_volumes_are_sparse_files_created_and_removed_with_the_volume(sim: AwsSim) -> None:
    ec2 = sim.client("ec2")
    inst = sim.make_instance("files", volume_gib=[1, 2])
    vols = sim.volume_ids(inst)
    assert len(vols) == 2
    paths = [sim.volume_path(v) for v in vols]
    assert [p.stat().st_size for p in paths] == [GIB, 2 * GIB]
    assert all(p.stat().st_blocks * 512 < (1 << 20) for p in paths)  # sparse
    desc = ec2.describe_instances(InstanceIds=[inst])["Reservations"][0]["Instances"][0]
    assert desc["RootDeviceName"] == "/dev/xvda"
    assert sorted(m["DeviceName"] for m in desc["BlockDeviceMappings"]) == ["/dev/xvda", "/dev/xvdb"]
    sim.write(vols[0], 4096, b"guest data")
    assert sim.read(vols[0], 4096, 10) == b"guest data"

    extra = ec2.create_volume(Size=1, AvailabilityZone=f"{sim.region}a")["VolumeId"]
    assert sim.volume_path(extra).stat().st_size == GIB
    extra_path = sim.volume_path(extra)
    ec2.delete_volume(VolumeId=extra)
    assert not extra_path.exists()

    ec2.terminate_instances(InstanceIds=[inst])  # DeleteOnTermination
    assert not any(p.exists() for p in paths)


# --------------------------------------------------------------------------- EC2 snapshots


def test_ec2_snapshots_capture_allocated_blocks_at_that_instant(sim: AwsSim) -> None:
    ec2, ebs = sim.client("ec2"), sim.client("ebs")
    inst = sim.make_instance("capture", volume_gib=[1, 1])
    a, b = sim.volume_ids(inst)
    sim.write(a, 0, b"A" * 1000)
    sim.write(a, 10 * BLOCK_SIZE + 7, b"B" * 700_000)  # blocks 10 and 11
    r = ec2.create_snapshots(InstanceSpecification={"InstanceId": inst})
    assert [s["State"] for s in r["Snapshots"]] == ["pending", "pending"]
    s1 = {s["VolumeId"]: s["SnapshotId"] for s in r["Snapshots"]}
    # only completed snapshots can be read (FAQ); DescribeSnapshots then shows completed
    with pytest.raises(ClientError) as e:
        ebs.list_snapshot_blocks(SnapshotId=s1[a])
    assert code(e) == "ValidationException"
    assert sim.wait_snapshot(s1[a]) == "completed"
    sim.write(a, 0, b"C" * 10)  # after the snapshot: not in it
    blocks = sim.snapshot_blocks(s1[a])
    assert sorted(blocks) == [0, 10, 11]
    assert blocks[0] == block(b"A" * 1000)
    assert blocks[10][7:] + blocks[11][: 700_000 - (BLOCK_SIZE - 7)] == b"B" * 700_000
    assert sim.snapshot_blocks(s1[b]) == {}
    assert sim.read_snapshot(s1[a], 16) == b"A" * 16

    # a second point of the same volume: changes are content differences
    sim.write(a, 3 * BLOCK_SIZE, b"new")
    punch_hole(sim.volume_path(a), 11 * BLOCK_SIZE, BLOCK_SIZE)  # block 11: unallocated now
    s2 = ec2_snapshots(sim, inst)
    s2a = next(s for s in s2 if ec2.describe_snapshots(SnapshotIds=[s])["Snapshots"][0]["VolumeId"] == a)
    changed = {c["BlockIndex"]: c for c in all_changed(ebs, FirstSnapshotId=s1[a], SecondSnapshotId=s2a)}
    assert sorted(changed) == [0, 3, 11]
    assert "FirstBlockToken" in changed[0] and "SecondBlockToken" in changed[0]
    assert "FirstBlockToken" not in changed[3] and "SecondBlockToken" in changed[3]
    assert "FirstBlockToken" in changed[11] and "SecondBlockToken" not in changed[11]
    # snapshots of another volume are not of the same lineage
    with pytest.raises(ClientError) as e:
        ebs.list_changed_blocks(FirstSnapshotId=s1[a], SecondSnapshotId=s1[b])
    assert code(e) == "ValidationException"
    assert e.value.response.get("Reason") == "UNRELATED_SNAPSHOTS"
    # without FirstSnapshotId: every block of the second
    only = all_changed(ebs, SecondSnapshotId=s2a)
    assert [c["BlockIndex"] for c in only] == [0, 3, 10]
    assert all("FirstBlockToken" not in c for c in only)

    ec2.delete_snapshot(SnapshotId=s1[a])
    with pytest.raises(ClientError) as e:
        ebs.list_snapshot_blocks(SnapshotId=s1[a])
    assert code(e) == "ResourceNotFoundException"
    assert sim.model_snapshot(s2a)["Blocks"] == 3
    for s in [s1[b], *s2]:
        ec2.delete_snapshot(SnapshotId=s)
    ec2.terminate_instances(InstanceIds=[inst])


# --------------------------------------------------------------------------- PutSnapshotBlock


def test_put_snapshot_block_rules(sim: AwsSim) -> None:
    ebs = sim.client("ebs")
    loose = sim.client("ebs", parameter_validation=False)
    r = ebs.start_snapshot(VolumeSize=1)
    assert r["BlockSize"] == BLOCK_SIZE and r["Status"] == "pending"
    snap = r["SnapshotId"]
    good = block(1)
    short = b"x" * 4096
    with pytest.raises(ClientError) as e:  # DataLength must be 524288
        ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=0, BlockData=short,
                               DataLength=len(short), Checksum=b64(short), ChecksumAlgorithm="SHA256")
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # checksum of another body
        ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=0, BlockData=good,
                               DataLength=BLOCK_SIZE, Checksum=b64(block(2)), ChecksumAlgorithm="SHA256")
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # the only algorithm is SHA256
        loose.put_snapshot_block(SnapshotId=snap, BlockIndex=0, BlockData=good,
                                 DataLength=BLOCK_SIZE, Checksum=b64(good), ChecksumAlgorithm="MD5")
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # 1 GiB = blocks 0..2047
        put(ebs, snap, 2048, good)
    assert code(e) == "ValidationException"
    put(ebs, snap, 2047, good)
    put(ebs, snap, 5, block(7))
    put(ebs, snap, 5, block(8))  # overwrites
    with pytest.raises(ClientError) as e:
        put(ebs, "snap-0000000000000dead", 0, good)
    assert code(e) == "ResourceNotFoundException"
    written = {5: block(8), 2047: good}
    ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=2, Checksum=linear(written),
                          ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
    assert sim.wait_snapshot(snap) == "completed"
    with pytest.raises(ClientError) as e:  # only a pending snapshot takes writes
        put(ebs, snap, 1, good)
    assert code(e) == "ValidationException"
    assert sim.snapshot_blocks(snap) == written
    stats = sim.stats()
    assert stats["bytes_written"] == 3 * BLOCK_SIZE
    assert stats["calls"]["PutSnapshotBlock"]["errors"] >= 5
    sim.client("ec2").delete_snapshot(SnapshotId=snap)


# --------------------------------------------------------------------------- StartSnapshot


def test_start_snapshot_rules(sim: AwsSim) -> None:
    ec2, ebs = sim.client("ec2"), sim.client("ebs")
    loose = sim.client("ebs", parameter_validation=False)
    parent = ebs_snapshot(sim, {0: block(1)}, size=2)
    with pytest.raises(ClientError) as e:
        ebs.start_snapshot(VolumeSize=2, ParentSnapshotId=parent, Encrypted=True)
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        ebs.start_snapshot(VolumeSize=2, ParentSnapshotId="snap-0000000000000beef")
    assert code(e) == "ResourceNotFoundException"
    with pytest.raises(ClientError) as e:  # smaller than the parent
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # Timeout is 10..4320 minutes
        loose.start_snapshot(VolumeSize=1, Timeout=4321)
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        loose.start_snapshot(VolumeSize=65537)
    assert code(e) == "ValidationException"
    pending = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError) as e:  # the parent must be completed
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=pending)
    assert code(e) == "ValidationException"

    # ClientToken idempotency: same token + same parameters -> the original result
    token = str(uuid.uuid4())
    tags = [{"Key": "transcend:point", "Value": "p1"}]
    r1 = ebs.start_snapshot(VolumeSize=2, ParentSnapshotId=parent, ClientToken=token, Tags=tags,
                            Description="point 1")
    r2 = ebs.start_snapshot(VolumeSize=2, ParentSnapshotId=parent, ClientToken=token, Tags=tags,
                            Description="point 1")
    assert r1["SnapshotId"] == r2["SnapshotId"] and r1["ParentSnapshotId"] == parent
    with pytest.raises(ClientError) as e:  # same token, other parameters
        ebs.start_snapshot(VolumeSize=3, ParentSnapshotId=parent, ClientToken=token, Tags=tags)
    assert code(e) == "ConflictException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409

    # EBS-made snapshots are EC2 snapshots: tags, state, delete
    d = ec2.describe_snapshots(SnapshotIds=[r1["SnapshotId"]])["Snapshots"][0]
    assert d["State"] == "pending" and d["VolumeSize"] == 2 and d["Description"] == "point 1"
    assert {t["Key"]: t["Value"] for t in d["Tags"]} == {"transcend:point": "p1"}
    found = ec2.describe_snapshots(Filters=[{"Name": "tag:transcend:point", "Values": ["p1"]}])
    assert [s["SnapshotId"] for s in found["Snapshots"]] == [r1["SnapshotId"]]
    enc = ebs.start_snapshot(VolumeSize=1, Encrypted=True)
    assert enc["SseType"] == "sse-ebs" and enc["KmsKeyArn"].startswith("arn:aws:kms:")
    for s in (r1["SnapshotId"], pending, parent, enc["SnapshotId"]):
        ec2.delete_snapshot(SnapshotId=s)
    with pytest.raises(ClientError) as e:
        put(ebs, pending, 0, block(1))
    assert code(e) == "ResourceNotFoundException"


def test_children_inherit_parent_blocks_and_survive_parent_deletion(sim: AwsSim) -> None:
    ec2, ebs = sim.client("ec2"), sim.client("ebs")
    a = ebs_snapshot(sim, {0: block(0xA0), 1: block(0xA1), 5: block(0xA5)})
    b = ebs_snapshot(sim, {1: block(0xB1), 2: block(0xB2)}, parent=a)
    c = ebs_snapshot(sim, {5: block(0xC5)}, parent=b, size=2)
    want_c = {0: block(0xA0), 1: block(0xB1), 2: block(0xB2), 5: block(0xC5)}
    assert sim.snapshot_blocks(b) == {0: block(0xA0), 1: block(0xB1), 2: block(0xB2), 5: block(0xA5)}
    assert sim.snapshot_blocks(c) == want_c
    changed = all_changed(ebs, FirstSnapshotId=a, SecondSnapshotId=c)
    assert [x["BlockIndex"] for x in changed] == [1, 2, 5]
    assert "FirstBlockToken" not in changed[1]
    # reversed order is the same lineage too
    assert [x["BlockIndex"] for x in all_changed(ebs, FirstSnapshotId=c, SecondSnapshotId=a)] == [1, 2, 5]
    sibling = ebs_snapshot(sim, {9: block(9)}, parent=a)
    with pytest.raises(ClientError) as e:
        ebs.list_changed_blocks(FirstSnapshotId=b, SecondSnapshotId=sibling)
    assert code(e) == "ValidationException"

    ec2.delete_snapshot(SnapshotId=a)
    ec2.delete_snapshot(SnapshotId=b)
    assert sim.snapshot_blocks(c) == want_c  # unchanged
    with pytest.raises(ClientError) as e:
        ebs.list_changed_blocks(FirstSnapshotId=b, SecondSnapshotId=c)
    assert code(e) == "ResourceNotFoundException"
    for s in (c, sibling):
        ec2.delete_snapshot(SnapshotId=s)
    assert not {a, b, c, sibling} & {s["id"] for s in sim.resources()["snapshots"]}


def test_ebs_child_of_an_ec2_snapshot(sim: AwsSim) -> None:
    ec2, ebs = sim.client("ec2"), sim.client("ebs")
    inst = sim.make_instance("ec2parent", volume_gib=[1])
    (vol,) = sim.volume_ids(inst)
    sim.write(vol, 0, b"from the volume")
    (base,) = ec2_snapshots(sim, inst)
    child = ebs_snapshot(sim, {4: block(4)}, parent=base)
    got = sim.snapshot_blocks(child)
    assert sorted(got) == [0, 4] and got[0].startswith(b"from the volume")
    assert [x["BlockIndex"] for x in all_changed(ebs, FirstSnapshotId=base, SecondSnapshotId=child)] == [4]
    for s in (child, base):
        ec2.delete_snapshot(SnapshotId=s)
    ec2.terminate_instances(InstanceIds=[inst])


# --------------------------------------------------------------------------- CompleteSnapshot


def test_complete_snapshot_count_and_linear_checksum(sim: AwsSim) -> None:
    ec2, ebs = sim.client("ec2"), sim.client("ebs")
    blocks = {3: block(3), 1: block(1), 2000: block(b"tail")}

    def started() -> str:
        snap: str = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        for i, d in blocks.items():
            put(ebs, snap, i, d)
        return snap

    ok = started()
    r = ebs.complete_snapshot(SnapshotId=ok, ChangedBlocksCount=3, Checksum=linear(blocks),
                              ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
    assert r["Status"] == "pending"
    assert ec2.describe_snapshots(SnapshotIds=[ok])["Snapshots"][0]["State"] == "completed"
    with pytest.raises(ClientError) as e:  # no second completion
        ebs.complete_snapshot(SnapshotId=ok, ChangedBlocksCount=3)
    assert code(e) == "ValidationException"

    wrong_count = started()
    ebs.complete_snapshot(SnapshotId=wrong_count, ChangedBlocksCount=2)
    assert sim.wait_snapshot(wrong_count) == "error"
    d = ec2.describe_snapshots(SnapshotIds=[wrong_count])["Snapshots"][0]
    assert "ChangedBlocksCount" in d["StateMessage"]

    # the aggregate is over the raw digests: concatenating the base64 strings is wrong
    as_text = started()
    text = "".join(b64(blocks[i]) for i in sorted(blocks)).encode()
    ebs.complete_snapshot(SnapshotId=as_text, ChangedBlocksCount=3,
                          Checksum=base64.b64encode(hashlib.sha256(text).digest()).decode(),
                          ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
    assert sim.wait_snapshot(as_text) == "error"
    unordered = started()  # index order, not write order
    h = hashlib.sha256()
    for i in blocks:
        h.update(hashlib.sha256(blocks[i]).digest())
    ebs.complete_snapshot(SnapshotId=unordered, ChangedBlocksCount=3,
                          Checksum=base64.b64encode(h.digest()).decode(),
                          ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
    assert sim.wait_snapshot(unordered) == "error"
    with pytest.raises(ClientError) as e:  # an error snapshot cannot be read
        ebs.list_snapshot_blocks(SnapshotId=unordered)
    assert code(e) == "ValidationException"
    for s in (ok, wrong_count, as_text, unordered):
        ec2.delete_snapshot(SnapshotId=s)


def test_pending_snapshot_times_out_on_the_model_clock(sim: AwsSim) -> None:
    ec2, ebs = sim.client("ec2"), sim.client("ebs")
    quiet = ebs.start_snapshot(VolumeSize=1, Timeout=10)["SnapshotId"]
    busy = ebs.start_snapshot(VolumeSize=1, Timeout=10)["SnapshotId"]
    sim.advance_clock(9 * 60)
    put(ebs, busy, 0, block(1))  # a write restarts the timeout
    sim.advance_clock(2 * 60)
    states = {s["SnapshotId"]: s["State"] for s in
              ec2.describe_snapshots(SnapshotIds=[quiet, busy])["Snapshots"]}
    assert states == {quiet: "error", busy: "pending"}
    with pytest.raises(ClientError) as e:
        put(ebs, quiet, 0, block(1))
    assert code(e) == "ValidationException"
    ebs.complete_snapshot(SnapshotId=busy, ChangedBlocksCount=1)
    assert sim.wait_snapshot(busy) == "completed"
    for s in (quiet, busy):
        ec2.delete_snapshot(SnapshotId=s)


# --------------------------------------------------------------------------- list calls


@pytest.fixture(scope="module")
def many(sim: AwsSim) -> Iterator[str]:
    """An EC2 snapshot with 250 allocated blocks (one byte written in each)."""
    inst = sim.make_instance("many", volume_gib=[1])
    (vol,) = sim.volume_ids(inst)
    fd = os.open(sim.volume_path(vol), os.O_WRONLY)
    try:
        for i in range(250):
            os.pwrite(fd, bytes([i % 255 + 1]), i * 2 * BLOCK_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)
    (snap,) = ec2_snapshots(sim, inst)
    yield snap
    sim.client("ec2").delete_snapshot(SnapshotId=snap)
    sim.client("ec2").terminate_instances(InstanceIds=[inst])


def test_list_snapshot_blocks_pages(sim: AwsSim, many: str) -> None:
    ebs = sim.client("ebs")
    loose = sim.client("ebs", parameter_validation=False)
    seen: list[int] = []
    pages = 0
    kw: dict[str, Any] = {"SnapshotId": many, "MaxResults": 100}
    while True:
        page = ebs.list_snapshot_blocks(**kw)
        pages += 1
        assert page["BlockSize"] == BLOCK_SIZE and page["VolumeSize"] == 1
        assert len(page["Blocks"]) <= 100
        seen += [b["BlockIndex"] for b in page["Blocks"]]
        if not page.get("NextToken"):
            break
        kw["NextToken"] = page["NextToken"]
    assert pages == 3 and seen == [2 * i for i in range(250)]
    start = ebs.list_snapshot_blocks(SnapshotId=many, StartingBlockIndex=401, MaxResults=100)
    assert start["Blocks"][0]["BlockIndex"] == 402
    for bad in (99, 10001):
        with pytest.raises(ClientError) as e:
            loose.list_snapshot_blocks(SnapshotId=many, MaxResults=bad)
        assert code(e) == "ValidationException"


def test_next_tokens_are_bound_and_expire(sim: AwsSim, many: str) -> None:
    ebs = sim.client("ebs")
    token = ebs.list_snapshot_blocks(SnapshotId=many, MaxResults=100)["NextToken"]
    with pytest.raises(ClientError) as e:  # a ListSnapshotBlocks token in ListChangedBlocks
        ebs.list_changed_blocks(SecondSnapshotId=many, MaxResults=100, NextToken=token)
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # tampered
        ebs.list_snapshot_blocks(SnapshotId=many, MaxResults=100, NextToken="A" + token[1:])
    assert code(e) == "ValidationException"
    ebs.list_snapshot_blocks(SnapshotId=many, MaxResults=100, NextToken=token)  # still fine
    sim.advance_clock(61 * 60)
    with pytest.raises(ClientError) as e:
        ebs.list_snapshot_blocks(SnapshotId=many, MaxResults=100, NextToken=token)
    assert code(e) == "ValidationException"
    assert "expired" in str(e.value)


def test_empty_pages_still_carry_a_next_token(sim: AwsSim, many: str) -> None:
    ebs = sim.client("ebs")
    sim.empty_pages(4)
    seen: list[int] = []
    empty = 0
    kw: dict[str, Any] = {"SecondSnapshotId": many, "MaxResults": 100}
    while True:
        page = ebs.list_changed_blocks(**kw)
        if not page["ChangedBlocks"]:
            empty += 1
            assert page["NextToken"]
        seen += [b["BlockIndex"] for b in page["ChangedBlocks"]]
        if not page.get("NextToken"):
            break
        kw["NextToken"] = page["NextToken"]
    assert empty == 4 and seen == [2 * i for i in range(250)]


# --------------------------------------------------------------------------- GetSnapshotBlock


def test_get_snapshot_block_tokens_checksums_and_corruption(sim: AwsSim, many: str) -> None:
    ebs = sim.client("ebs")
    blocks = ebs.list_snapshot_blocks(SnapshotId=many, MaxResults=100)["Blocks"]
    b0, b1 = blocks[0], blocks[1]
    r = ebs.get_snapshot_block(SnapshotId=many, BlockIndex=b1["BlockIndex"], BlockToken=b1["BlockToken"])
    data = r["BlockData"].read()
    assert r["DataLength"] == BLOCK_SIZE == len(data) and r["ChecksumAlgorithm"] == "SHA256"
    assert r["Checksum"] == b64(data) and data[0] == 2
    with pytest.raises(ClientError) as e:  # the token of another block
        ebs.get_snapshot_block(SnapshotId=many, BlockIndex=b0["BlockIndex"], BlockToken=b1["BlockToken"])
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        ebs.get_snapshot_block(SnapshotId=many, BlockIndex=0, BlockToken="bm90IGEgdG9rZW4=")
    assert code(e) == "ValidationException"

    sim.fault("corrupt", 2)
    bad = 0
    for _ in range(3):
        r = ebs.get_snapshot_block(SnapshotId=many, BlockIndex=0, BlockToken=b0["BlockToken"])
        bad += r["Checksum"] != b64(r["BlockData"].read())
    assert bad == 2
    assert sim.stats()["bytes_read"] == 4 * BLOCK_SIZE

    sim.advance_clock(7 * 24 * 3600 + 1)  # block tokens live 7 days
    with pytest.raises(ClientError) as e:
        ebs.get_snapshot_block(SnapshotId=many, BlockIndex=0, BlockToken=b0["BlockToken"])
    assert code(e) == "ValidationException"
    assert "expired" in str(e.value)


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("kind,error", [("throttle", "ThrottlingException"),
                                        ("throttle_request", "RequestThrottledException"),
                                        ("500", "InternalServerException"),
                                        ("503", "ServiceUnavailableException")])
def test_injected_faults_are_retried_by_botocore(sim: AwsSim, many: str, kind: str, error: str) -> None:
    sim.fault(kind, 2, api="ListSnapshotBlocks")
    assert sim.client("ebs", max_attempts=3).list_snapshot_blocks(SnapshotId=many, MaxResults=100)["Blocks"]
    calls = sim.stats()["calls"]["ListSnapshotBlocks"]
    assert calls == {"served": 1, "injected": 2, "errors": 0}
    sim.fault(kind, 1)  # any EBS operation
    with pytest.raises(ClientError) as e:
        sim.client("ebs", max_attempts=1).list_snapshot_blocks(SnapshotId=many, MaxResults=100)
    assert code(e) == error


def test_ec2_throttling_is_injected_by_action(sim: AwsSim) -> None:
    sim.fault("throttle", 2, api="DescribeInstances")
    sim.client("ec2", max_attempts=3).describe_instances()
    assert sim.stats()["calls"]["DescribeInstances"] == {"served": 1, "injected": 2, "errors": 0}
    sim.fault("503", 1, api="DescribeInstances")
    with pytest.raises(ClientError) as e:
        sim.client("ec2", max_attempts=1).describe_instances()
    assert code(e) == "Unavailable"


def test_snapshot_quota(sim: AwsSim) -> None:
    inst = sim.make_instance("quota", volume_gib=[1])
    sim.fault("quota", 2)
    with pytest.raises(ClientError) as e:
        sim.client("ebs").start_snapshot(VolumeSize=1)
    assert code(e) == "ServiceQuotaExceededException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 402
    with pytest.raises(ClientError) as e:
        sim.client("ec2").create_snapshots(InstanceSpecification={"InstanceId": inst})
    assert code(e) == "SnapshotLimitExceeded"
    stats = sim.stats()["calls"]
    assert stats["StartSnapshot"]["injected"] == 1 and stats["CreateSnapshots"]["injected"] == 1
    sim.client("ec2").terminate_instances(InstanceIds=[inst])


# --------------------------------------------------------------------------- booting


def test_boot_from_registered_snapshots(sim: AwsSim) -> None:
    ec2 = sim.client("ec2")
    root_parent = ebs_snapshot(sim, {0: block(b"MBR"), 1: block(0x11)})
    root = ebs_snapshot(sim, {1: block(0x22), 7: block(0x77)}, parent=root_parent)
    data_inst = sim.make_instance("data-src", volume_gib=[2])
    (data_vol,) = sim.volume_ids(data_inst)
    sim.write(data_vol, GIB + 12345, b"second disk")
    (data_snap,) = ec2_snapshots(sim, data_inst)
    ec2.terminate_instances(InstanceIds=[data_inst])

    with pytest.raises(ClientError) as e:  # a volume cannot be smaller than its snapshot
        ec2.register_image(Name="too-small", RootDeviceName="/dev/xvda",
                           BlockDeviceMappings=[{"DeviceName": "/dev/xvdb",
                                                 "Ebs": {"SnapshotId": data_snap, "VolumeSize": 1}}])
    assert code(e) == "InvalidParameterValue"
    image = ec2.register_image(
        Name="recovered-vm1", RootDeviceName="/dev/xvda", VirtualizationType="hvm",
        Architecture="x86_64", BootMode="uefi", EnaSupport=True,
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": root, "VolumeType": "gp3"}},
                             {"DeviceName": "/dev/xvdb", "Ebs": {"SnapshotId": data_snap, "VolumeSize": 3}}],
        TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "transcend:vm", "Value": "vm1"}]}],
    )["ImageId"]
    img = ec2.describe_images(ImageIds=[image])["Images"][0]
    assert img["RootDeviceName"] == "/dev/xvda" and img["RootDeviceType"] == "ebs"
    assert {m["DeviceName"]: m["Ebs"]["SnapshotId"] for m in img["BlockDeviceMappings"]} == \
        {"/dev/xvda": root, "/dev/xvdb": data_snap}
    assert {t["Key"]: t["Value"] for t in img.get("Tags", [])} == {"transcend:vm": "vm1"}
    with pytest.raises(ClientError) as e:  # in use by the image
        ec2.delete_snapshot(SnapshotId=root)
    assert code(e) == "InvalidSnapshot.InUse"

    inst = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.small")
    inst_id = inst["Instances"][0]["InstanceId"]
    desc = ec2.describe_instances(InstanceIds=[inst_id])["Reservations"][0]["Instances"][0]
    assert desc["RootDeviceName"] == "/dev/xvda"
    vols = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in desc["BlockDeviceMappings"]}
    assert sorted(vols) == ["/dev/xvda", "/dev/xvdb"]
    sizes = {v["VolumeId"]: v["Size"] for v in ec2.describe_volumes(VolumeIds=list(vols.values()))["Volumes"]}
    assert sizes[vols["/dev/xvda"]] == 1 and sizes[vols["/dev/xvdb"]] == 3
    assert sim.read(vols["/dev/xvda"], 0, 3) == b"MBR"
    assert sim.read(vols["/dev/xvda"], BLOCK_SIZE, 4) == bytes([0x22]) * 4
    assert sim.read(vols["/dev/xvda"], 7 * BLOCK_SIZE, 4) == bytes([0x77]) * 4
    assert sim.read(vols["/dev/xvdb"], GIB + 12345, 11) == b"second disk"
    paths = [sim.volume_path(v) for v in vols.values()]

    # a snapshot of the booted root volume is of the lineage of the snapshot it came from
    sim.write(vols["/dev/xvda"], 9 * BLOCK_SIZE, b"after boot")
    r = ec2.create_snapshot(VolumeId=vols["/dev/xvda"])
    assert r["State"] == "pending"
    assert sim.wait_snapshot(r["SnapshotId"]) == "completed"
    ebs = sim.client("ebs")
    changed = all_changed(ebs, FirstSnapshotId=root, SecondSnapshotId=r["SnapshotId"])
    assert [c["BlockIndex"] for c in changed] == [9]
    ec2.delete_snapshot(SnapshotId=r["SnapshotId"])
    # CreateVolume from a snapshot: the file holds the snapshot's content
    restored = ec2.create_volume(SnapshotId=root, AvailabilityZone=f"{sim.region}a")["VolumeId"]
    assert sim.read(restored, 0, 3) == b"MBR" and sim.read(restored, BLOCK_SIZE, 1) == b"\x22"
    ec2.delete_volume(VolumeId=restored)

    ec2.terminate_instances(InstanceIds=[inst_id])  # DeleteOnTermination defaults to true
    assert not any(p.exists() for p in paths)
    ec2.deregister_image(ImageId=image)
    for s in (root, root_parent, data_snap):
        ec2.delete_snapshot(SnapshotId=s)


def test_resources_lists_what_tests_made(sim: AwsSim) -> None:
    ec2 = sim.client("ec2")
    before = sim.resources()
    inst = sim.make_instance("leak", volume_gib=[1])
    snap = ebs_snapshot(sim, {0: block(1)}, tags={"transcend:leak": "1"})
    now = sim.resources()
    assert {s["id"]: s["tags"] for s in now["snapshots"]}[snap] == {"transcend:leak": "1"}
    assert inst in [i["id"] for i in now["instances"] if i["state"] == "running"]
    assert len(now["volumes"]) == len(before["volumes"]) + 1
    ec2.delete_snapshot(SnapshotId=snap)
    ec2.terminate_instances(InstanceIds=[inst])
    after = sim.resources()
    assert snap not in [s["id"] for s in after["snapshots"]]
    assert [i["state"] for i in after["instances"] if i["id"] == inst] == ["terminated"]
    assert len(after["volumes"]) == len(before["volumes"])
    assert after["volume_files"] == sorted(v["id"] for v in after["volumes"])


def test_startup_failure_shows_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import tests.harness.aws as harness

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setattr(harness, "_free_port", lambda: busy.getsockname()[1])
        with pytest.raises(RuntimeError, match=r"exited with .* before it was ready") as e, \
                aws_sim(tmp_path):
            pass
    assert "Address already in use" in str(e.value)

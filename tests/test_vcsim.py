"""The vCenter simulator the VMware connector is tested against: govmomi's
simulator plus the harness's disk-file, snapshot and CBT model
(tests/harness/vcsim_go), driven through pyVmomi like a real vCenter."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
import requests
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from tests.harness.vcsim import (
    VcSim,
    create_vm,
    current_file,
    find,
    remove,
    snapshot,
    the_disk,
    write,
)

MiB = 1 << 20
BLOCK = 64 * 1024
DISK = 64 * MiB
CHANGE_ID = re.compile(r"^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/\d+$")


@pytest.fixture(autouse=True)
def _reset(sim: VcSim) -> Iterator[None]:
    yield
    sim.clear_faults()
    sim.set_page_limit(64)
    sim.set_free_space(None)


# ---------------------------------------------------------------- helpers


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pattern(seed: int, n: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32) + b"\x5a" * (n % 32)


Areas = list[tuple[int, int]]


def changed_areas(vm: Any, snap: Any, key: int, change_id: str, capacity: int) -> tuple[Areas, int]:
    """All changed areas, looping by start offset as the API requires; returns (areas, calls)."""
    areas: list[tuple[int, int]] = []
    start, calls = 0, 0
    while start < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=start, changeId=change_id)
        calls += 1
        assert info.startOffset == start and info.length > 0
        for a in info.changedArea or []:
            assert start <= a.start and a.start + a.length <= start + info.length
            areas.append((a.start, a.length))
        start = info.startOffset + info.length
    return areas, calls


def blocks_of(regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The 64 KiB-aligned areas (merged when adjacent) that cover the regions."""
    blocks = sorted({b for off, n in regions for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)})
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b * BLOCK:
            out[-1] = (out[-1][0], out[-1][1] + BLOCK)
        else:
            out.append((b * BLOCK, BLOCK))
    return out


def cbt_vm(si: Any, sim: VcSim) -> Any:
    """A VM with CBT enabled and activated (the snapshot create+remove cycle)."""
    vm = create_vm(si, sim)
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    remove(snapshot(vm, "cbt-on"))
    assert CHANGE_ID.match(the_disk(vm).backing.changeId)
    return vm


def session_cookie(si: Any) -> dict[str, str]:
    value = SimpleCookie(si._stub.cookie)["vmware_soap_session"].value
    return {"Cookie": f'vmware_soap_session="{value}"'}


# ---------------------------------------------------------------- tests


def test_login_and_bad_password(sim: VcSim, si: Any) -> None:
    assert si.content.about.apiType == "VirtualCenter"
    assert si.content.sessionManager.currentSession.userName == sim.user
    with pytest.raises(vim.fault.InvalidLogin):
        sim.connect(password="wrong")
    with pytest.raises(vim.fault.InvalidLogin):
        sim.connect(user="nobody")


def test_created_vm_disk_is_a_real_sparse_file(sim: VcSim, si: Any) -> None:
    vm = create_vm(si, sim)
    disk = the_disk(vm)
    name = vm.config.name
    assert disk.backing.fileName == f"[{sim.datastore}] {name}/{name}.vmdk"
    assert disk.capacityInBytes == DISK
    flat = sim.dir / name / f"{name}-flat.vmdk"
    assert current_file(sim, vm) == flat
    assert flat.stat().st_size == DISK
    assert flat.stat().st_blocks == 0  # thin: nothing allocated yet
    desc = (sim.dir / name / f"{name}.vmdk").read_text()
    assert desc.startswith("# Disk DescriptorFile")
    assert f'RW {DISK // 512} VMFS "{name}-flat.vmdk"' in desc

    # grow through ReconfigVM: the flat file follows
    disk.capacityInKB = 2 * DISK // 1024
    disk.capacityInBytes = 2 * DISK
    change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))
    assert flat.stat().st_size == 2 * DISK
    assert the_disk(vm).capacityInBytes == 2 * DISK


def test_cbt_takes_effect_after_stun_and_snapshot_shows_frozen_backing(sim: VcSim, si: Any) -> None:
    vm = create_vm(si, sim)
    name = vm.config.name
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled is True
    assert not the_disk(vm).backing.changeId  # not before a stun/unstun

    s0 = snapshot(vm, "activate")
    assert not the_disk(s0).backing.changeId  # tracking starts at this stun
    remove(s0)
    cid0 = the_disk(vm).backing.changeId
    assert CHANGE_ID.match(cid0)
    assert the_disk(vm).backing.fileName == f"[{sim.datastore}] {name}/{name}.vmdk"

    s1 = snapshot(vm, "backup")
    frozen = the_disk(s1).backing
    assert CHANGE_ID.match(frozen.changeId)
    assert frozen.changeId.split("/")[0] == cid0.split("/")[0]  # same epoch
    assert int(frozen.changeId.split("/")[1]) > int(cid0.split("/")[1])  # sequence advances
    assert frozen.fileName == f"[{sim.datastore}] {name}/{name}.vmdk"
    assert frozen.parent is None
    current = the_disk(vm).backing
    assert current.fileName == f"[{sim.datastore}] {name}/{name}-000001.vmdk"
    assert current.parent.fileName == frozen.fileName
    assert current_file(sim, vm) == sim.dir / name / f"{name}-000001-delta.vmdk"
    delta_desc = (sim.dir / name / f"{name}-000001.vmdk").read_text()
    assert f'parentFileNameHint="{name}.vmdk"' in delta_desc


def test_star_and_incremental_queries_across_pages(sim: VcSim, si: Any) -> None:
    vm = cbt_vm(si, sim)
    key = the_disk(vm).key
    first = [(0, 4096), (5 * MiB + 100, 70_000), (40 * MiB, MiB)]
    for i, (off, n) in enumerate(first):
        write(current_file(sim, vm), off, pattern(i, n))
    s1 = snapshot(vm, "full")
    cid1 = the_disk(s1).backing.changeId

    sim.set_page_limit(1)
    areas, calls = changed_areas(vm, s1, key, "*", DISK)
    assert areas == blocks_of(first)
    assert calls >= len(blocks_of(first))  # one area per page
    remove(s1)

    second = [(64 * 1024 * 3, 10), (20 * MiB - 10, 20), (63 * MiB, 3 * BLOCK)]
    for i, (off, n) in enumerate(second):
        write(current_file(sim, vm), off, pattern(100 + i, n))
    s2 = snapshot(vm, "incr")
    sim.set_page_limit(2)
    areas, calls = changed_areas(vm, s2, key, cid1, DISK)
    assert areas == blocks_of(second)
    assert len(areas) == 3 and calls == 2  # 2 areas on the first page, the last one on the second

    # the same answer in one page when the limit allows it
    sim.set_page_limit(64)
    info = vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key, startOffset=0, changeId=cid1)
    assert info.length == DISK
    assert [(a.start, a.length) for a in info.changedArea] == blocks_of(second)

    # nothing changed since the snapshot's own changeId
    cid2 = the_disk(s2).backing.changeId
    assert changed_areas(vm, s2, key, cid2, DISK)[0] == []
    remove(s2)


def test_frozen_parent_read_over_folder_with_range(sim: VcSim, si: Any) -> None:
    vm = cbt_vm(si, sim)
    name = vm.config.name
    old = pattern(7, 3 * BLOCK)
    write(current_file(sim, vm), 8 * MiB, old)
    snap = snapshot(vm, "frozen")
    base = the_disk(snap).backing.fileName.replace(".vmdk", "-flat.vmdk")
    write(current_file(sim, vm), 8 * MiB, pattern(8, 3 * BLOCK))  # the guest keeps writing

    url = sim.folder_url(base)
    rng = {"Range": f"bytes={8 * MiB + 1000}-{8 * MiB + 2 * BLOCK - 1}"}
    r = requests.get(url, headers={**rng, **session_cookie(si)}, verify=str(sim.cert_file), timeout=30)
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes {8 * MiB + 1000}-{8 * MiB + 2 * BLOCK - 1}/{DISK}"
    assert r.content == old[1000:2 * BLOCK]
    whole = requests.get(url, headers=session_cookie(si), verify=str(sim.cert_file), timeout=30)
    assert hashlib.sha256(whole.content).hexdigest() == sha(sim.dir / name / f"{name}-flat.vmdk")

    assert requests.get(url, headers=rng, verify=str(sim.cert_file), timeout=30).status_code == 401
    bad = {"Cookie": 'vmware_soap_session="not-a-session"'}
    assert requests.get(url, headers=bad, verify=str(sim.cert_file), timeout=30).status_code == 401
    put = requests.put(url, data=b"x", headers=session_cookie(si), verify=str(sim.cert_file), timeout=30)
    assert put.status_code == 405
    remove(snap)


def test_rejected_change_ids(sim: VcSim, si: Any) -> None:
    vm = cbt_vm(si, sim)
    key = the_disk(vm).key
    s1 = snapshot(vm, "one")
    cid1 = the_disk(s1).backing.changeId
    remove(s1)
    s2 = snapshot(vm, "two")

    with pytest.raises(vmodl.fault.InvalidArgument) as bad:
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key, startOffset=0, changeId="garbage")
    assert bad.value.invalidProperty == "changeId"
    unknown = "52 00 11 22 33 44 55 66-77 88 99 aa bb cc dd ee/1"
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key, startOffset=0, changeId=unknown)
    epoch = cid1.split("/")[0]
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key, startOffset=0, changeId=f"{epoch}/999")
    assert vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key, startOffset=0, changeId=cid1).length == DISK
    remove(s2)

    # CBT reset: a new epoch, every earlier changeId is rejected
    disks = sim.cbt_reset(vm._moId)
    new_cid = the_disk(vm).backing.changeId
    assert disks[0]["changeId"] == new_cid and new_cid.split("/")[0] != epoch
    write(current_file(sim, vm), 0, b"after reset")
    s3 = snapshot(vm, "three")
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=s3, deviceKey=key, startOffset=0, changeId=cid1)
    info = vm.QueryChangedDiskAreas(snapshot=s3, deviceKey=key, startOffset=0, changeId=new_cid)
    assert [(a.start, a.length) for a in info.changedArea] == [(0, BLOCK)]
    remove(s3)

    # disabling CBT also ends the epoch; queries fail until it is re-enabled and stunned
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    assert not the_disk(vm).backing.changeId
    s4 = snapshot(vm, "untracked")
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=s4, deviceKey=key, startOffset=0, changeId="*")
    remove(s4)


def test_injected_snapshot_failure_leaves_no_snapshot(sim: VcSim, si: Any) -> None:
    vm = cbt_vm(si, sim)
    before = sim.disk_info(vm._moId)["disks"]
    sim.inject_fault("CreateSnapshot_Task", "SnapshotFault", vm=vm._moId)
    with pytest.raises(vim.fault.SnapshotFault):
        snapshot(vm, "doomed")
    assert vm.snapshot is None
    assert sim.disk_info(vm._moId)["disks"] == before
    remove(snapshot(vm, "fine"))  # only the next call failed


def test_datastore_full(sim: VcSim, si: Any) -> None:
    sim.inject_fault("CreateVM_Task", "NoDiskSpace", fields={"Datastore": sim.datastore})
    with pytest.raises(vim.fault.NoDiskSpace) as e:
        create_vm(si, sim)
    assert e.value.datastore == sim.datastore

    sim.set_free_space(10 * MiB)
    ds = find(si, vim.Datastore)
    assert ds.summary.freeSpace == 10 * MiB
    with pytest.raises(vim.fault.NoDiskSpace):
        create_vm(si, sim, thin=False)  # 64 MiB thick does not fit
    vm = create_vm(si, sim, thin=True)  # thin only needs its metadata
    assert current_file(sim, vm).stat().st_size == DISK


def test_remove_consolidates_and_revert_restores(sim: VcSim, si: Any) -> None:
    vm = cbt_vm(si, sim)
    name = vm.config.name
    image = bytearray(DISK)

    def put(off: int, data: bytes) -> None:
        write(current_file(sim, vm), off, data)
        image[off:off + len(data)] = data

    put(MiB, pattern(1, 100_000))
    s1 = snapshot(vm, "s1")
    at_s1 = hashlib.sha256(image).hexdigest()
    put(2 * MiB, pattern(2, 5000))
    s2 = snapshot(vm, "s2")
    put(3 * MiB, pattern(3, 5000))
    assert the_disk(vm).backing.fileName.endswith(f"{name}-000002.vmdk")
    assert the_disk(vm).backing.parent.parent.fileName.endswith(f"{name}.vmdk")

    # revert to s1: the running disk has s1's content again
    WaitForTask(s1.RevertToSnapshot_Task())
    assert sha(current_file(sim, vm)) == at_s1
    image[:] = (sim.dir / name / f"{name}-flat.vmdk").read_bytes()
    put(4 * MiB, pattern(4, 5000))
    now = hashlib.sha256(image).hexdigest()

    # delete everything: the current content survives on the base disk's names
    WaitForTask(vm.RemoveAllSnapshots_Task())
    assert vm.snapshot is None
    flat = sim.dir / name / f"{name}-flat.vmdk"
    assert current_file(sim, vm) == flat
    assert the_disk(vm).backing.fileName == f"[{sim.datastore}] {name}/{name}.vmdk"
    assert the_disk(vm).backing.parent is None
    assert sha(flat) == now
    assert sorted(p.name for p in (sim.dir / name).glob("*.vmdk")) == [f"{name}-flat.vmdk", f"{name}.vmdk"]
    del s2

    # single snapshot delete after more writes: same rule
    s3 = snapshot(vm, "s3")
    put(5 * MiB, pattern(5, 5000))
    remove(s3)
    assert current_file(sim, vm) == flat
    assert sha(flat) == hashlib.sha256(image).hexdigest()

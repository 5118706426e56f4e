"""The test guest under libvirt (TCG): boots from its own disk, writes records, survives crashes.

What is real here: libvirtd + QEMU (``type='qemu'``, no /dev/kvm), SeaBIOS booting the
guest disk through syslinux, the Debian cloud kernel, busybox init/acpid, qemu-nbd
for the NBD read path.  See docs/test-guest.md.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.harness.guest import (
    BOOT_MARKER,
    ERROR_MARKER,
    FILL_LINE,
    PROGRESS_MARKER,
    STOPPED_MARKER,
    GuestConfig,
    GuestImage,
    build_guest,
    make_guest_disk,
)
from tests.harness.libvirtd import (
    LibvirtdStatus,
    destroy_domain,
    ensure_libvirtd,
    running_domain,
    shutdown_domain,
    wait_for_console,
)
from tests.harness.nbd import qemu_nbd
from tests.harness.records import (
    check_contiguous,
    make_record,
    parse_records,
    read_config,
    read_records,
    write_records_region,
)

BOOT_TIMEOUT = 120
FAIL = rf"^{ERROR_MARKER}.*"


def _name(tag: str) -> str:
    return f"transcend-harness-{tag}-{os.getpid()}"


@pytest.fixture(scope="module")
def libvirt_status() -> LibvirtdStatus:
    return ensure_libvirtd()


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


# ----------------------------------------------------------------- no guest needed


def test_check_contiguous_accepts_prefixes_and_names_gaps() -> None:
    assert check_contiguous([]) == 0
    assert check_contiguous([1, 2, 3]) == 3
    with pytest.raises(AssertionError, match=r"expected record 2, found 3 \(record 2 missing"):
        check_contiguous([1, 3, 4])
    with pytest.raises(AssertionError, match=r"expected record 1, found 5 \(records 1\.\.4 missing"):
        check_contiguous([5, 6])
    with pytest.raises(AssertionError, match=r"expected record 3, found 2 \(duplicate"):
        check_contiguous([1, 2, 2])


def test_parse_records_rejects_torn_and_misplaced_records() -> None:
    rs = 1024
    config = GuestConfig(rate=5, record_size=rs).to_sector().ljust(rs, b"\0")
    slots = [config] + [make_record(i, rs) for i in range(1, 7)]
    assert parse_records(b"".join(slots), rs) == [1, 2, 3, 4, 5, 6]
    torn = bytearray(slots[3])
    torn[rs - 1] ^= 1  # last byte of record 3: its second sector never reached the disk
    slots[3] = bytes(torn)
    slots[5] = make_record(4, rs)  # record 4 again, in slot 5
    found = parse_records(b"".join(slots), rs)
    assert found == [1, 2, 4, 4, 6]
    with pytest.raises(AssertionError, match="expected record 3, found 4"):
        check_contiguous(found)
    # the constant payload must not be mistaken for a record start
    assert FILL_LINE not in make_record(1, rs)[:128]


# ----------------------------------------------------------------- booted guests


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_guest_boots_continues_sequence_writes_and_powers_off(
    image: GuestImage, libvirt_status: LibvirtdStatus, tmp_path: Path
) -> None:
    disk = make_guest_disk(tmp_path / "guest.qcow2", rate=25, progress_every=20, image=image)
    assert read_config(disk) == GuestConfig(rate=25, record_size=512, progress_every=20)
    # An earlier life of this disk: records 1..40 and a torn record 41.
    torn = bytearray(make_record(41))
    torn[300] ^= 0xFF
    write_records_region(disk, 512, b"".join(make_record(i) for i in range(1, 41)) + torn)
    assert read_records(disk) == list(range(1, 41))

    console = tmp_path / "console.log"
    with running_domain(_name("boot"), disk, console) as dom:
        t0 = time.monotonic()
        booted = wait_for_console(console, rf"^{BOOT_MARKER} seq=(\d+)", BOOT_TIMEOUT,
                                  fail_pattern=FAIL, domain=dom)
        boot_seconds = time.monotonic() - t0
        assert int(booted.group(1)) == 40, "the guest must continue after the last valid record"
        wait_for_console(console, rf"^{PROGRESS_MARKER} seq=100\b", 60, fail_pattern=FAIL,
                         domain=dom)
        # readable while the domain runs (qemu-img -U): already a contiguous prefix
        assert check_contiguous(read_records(disk)) >= 100
        assert shutdown_domain(dom, timeout=60), "the guest did not power off on ACPI shutdown"
        stopped = wait_for_console(console, rf"^{STOPPED_MARKER} seq=(\d+)", 5)
    print(f"boot to marker under TCG: {boot_seconds:.1f} s")

    records = read_records(disk)
    last = check_contiguous(records)
    assert last == int(stopped.group(1))
    assert last >= 100

    with qemu_nbd(disk, fmt="qcow2", read_only=True) as srv:
        assert read_records(srv.uri) == records

    # Damaged copies must be caught: a flipped payload byte, a record in the wrong slot.
    flipped = tmp_path / "flipped.qcow2"
    shutil.copyfile(disk, flipped)
    write_records_region(flipped, 50 * 512 + 300, b"\x00")
    with pytest.raises(AssertionError, match="expected record 50, found 51"):
        check_contiguous(read_records(flipped))
    moved = tmp_path / "moved.qcow2"
    shutil.copyfile(disk, moved)
    write_records_region(moved, 61 * 512, make_record(70))
    with pytest.raises(AssertionError, match="expected record 61, found 70"):
        check_contiguous(read_records(moved))


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_guest_crash_leaves_a_contiguous_prefix_and_reboot_continues_it(
    image: GuestImage, libvirt_status: LibvirtdStatus, tmp_path: Path
) -> None:
    disk = make_guest_disk(tmp_path / "guest.qcow2", rate=math.inf, record_size=4096,
                           progress_every=25, image=image)
    console = tmp_path / "console.log"
    with running_domain(_name("crash"), disk, console) as dom:
        wait_for_console(console, rf"^{BOOT_MARKER} seq=0\b", BOOT_TIMEOUT, fail_pattern=FAIL,
                         domain=dom)
        wait_for_console(console, rf"^{PROGRESS_MARKER} seq=75\b", 60, fail_pattern=FAIL,
                         domain=dom)
        destroy_domain(dom)  # power cut in the middle of the record stream
    last = check_contiguous(read_records(disk))
    assert last >= 75

    with running_domain(_name("crash"), disk, console) as dom:
        booted = wait_for_console(console, rf"^{BOOT_MARKER} seq=(\d+)", BOOT_TIMEOUT,
                                  fail_pattern=FAIL, domain=dom)
        assert int(booted.group(1)) == last
        target = (last // 25 + 2) * 25
        wait_for_console(console, rf"^{PROGRESS_MARKER} seq={target}\b", 60, fail_pattern=FAIL,
                         domain=dom)
        assert shutdown_domain(dom, timeout=60)
    assert check_contiguous(read_records(disk)) >= target

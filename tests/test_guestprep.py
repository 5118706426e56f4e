"""Guest preparation before a recovered VM's first boot (transcend/guestprep.py).

* Re-IP rules, unit-tested on the configuration formats they rewrite, then end to
  end: a real guest with a static address (ifupdown) is test-failed-over with a
  rule; libguestfs rewrites the *overlay* before the domain starts, and the guest
  itself reports the new address on its console (it runs ``ifup -a`` at boot). The
  point's layer is byte-identical before and after.
* Conversion: ``virt-v2v-in-place`` forced on the busybox test guest (it has no
  distribution virt-v2v can inspect) fails, and the failure carries the tool's own
  log; nothing is left behind and the point is unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import libvirt
import pytest
from temporalio.client import WorkflowFailureError

from tests.harness.guest import NET_MARKER, GuestImage
from tests.harness.libvirtd import traversable, wait_for_console
from tests.harness.protect import (
    add_kvm_platforms,
    booted_guest,
    failure_text,
    protection_spec,
    source_network,
    start_protection,
    wait_first_point,
    wait_phase,
)
from tests.harness.stack import Stack
from transcend import api
from transcend.api import CONTROL_TASK_QUEUE, HealthCheck
from transcend.guestprep import ReIpRule, translate_text
from transcend.models import ProtectionPolicy

IFUPDOWN = """auto lo
iface lo inet loopback

auto eth0
iface eth0 inet static
    address 10.77.0.5
    netmask 255.255.255.0
    gateway 10.77.0.1
    dns-nameservers 10.77.0.53 8.8.8.8
"""
RULE = ReIpRule(from_cidr="10.77.0.0/24", to_cidr="192.168.77.0/24")


def test_translate_formats() -> None:
    new, moved = translate_text(IFUPDOWN, [RULE])
    assert "address 192.168.77.5\n" in new and "gateway 192.168.77.1\n" in new
    assert "dns-nameservers 192.168.77.53 8.8.8.8" in new  # outside the subnet: kept
    assert moved == ["10.77.0.5 -> 192.168.77.5", "10.77.0.1 -> 192.168.77.1",
                     "10.77.0.53 -> 192.168.77.53"]
    netplan = "network:\n  ethernets:\n    ens3:\n      addresses: [10.77.0.9/24]\n" \
              "      routes:\n        - to: default\n          via: 10.77.0.1\n"
    assert "[192.168.77.9/24]" in translate_text(netplan, [RULE])[0]
    ifcfg = "DEVICE=eth0\nBOOTPROTO=none\nIPADDR=10.77.0.20\nPREFIX=24\nGATEWAY=10.77.0.1\n"
    assert "IPADDR=192.168.77.20\n" in translate_text(ifcfg, [RULE])[0]
    keyfile = "[ipv4]\nmethod=manual\naddress1=10.77.0.30/24,10.77.0.1\ndns=10.77.0.53;\n"
    assert "address1=192.168.77.30/24,192.168.77.1" in translate_text(keyfile, [RULE])[0]
    # not addresses: versions, longer dotted numbers, another subnet
    text = "version 10.77.0.5.1\nmac 10.77.0.55.2.1\naddress 10.78.0.5\n"
    assert translate_text(text, [RULE]) == (text, [])


def test_rules_are_checked() -> None:
    with pytest.raises(ValueError, match="same prefix length"):
        ReIpRule(from_cidr="10.0.0.0/24", to_cidr="192.168.0.0/16")
    with pytest.raises(ValueError, match="not an IPv4 subnet"):
        ReIpRule(from_cidr="10.0.0.5/24", to_cidr="192.168.0.0/24")  # host bits set


def test_operation_rules_win_over_the_runbook() -> None:
    from activities.points import reip_rules

    other = ReIpRule(from_cidr="10.9.0.0/16", to_cidr="172.16.0.0/16")
    test_rule = ReIpRule(from_cidr="10.77.0.0/24", to_cidr="10.99.0.0/24")
    policy = ProtectionPolicy(rpo_seconds=60, reip=[RULE], test_reip=[test_rule])
    assert reip_rules([], policy, test=False) == [RULE]  # failover, migration
    assert reip_rules([], policy, test=True) == [test_rule]  # test failover
    assert reip_rules([other], policy, test=True) == [other]
    assert reip_rules([other], policy, test=False) == [other]
    assert reip_rules([], ProtectionPolicy(rpo_seconds=60), test=False) == []
    # the rules are validated where the policy is
    with pytest.raises(ValueError, match="same prefix length"):
        ProtectionPolicy(rpo_seconds=60, reip=[{"from_cidr": "10.0.0.0/24",
                                                 "to_cidr": "10.1.0.0/16"}])


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _domains() -> set[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()


@pytest.mark.guest
@pytest.mark.timeout(1500)
def test_reip_reaches_the_guest_and_conversion_failure_carries_the_log(
    guest_image: GuestImage, stack: Stack, tmp_path: Path
) -> None:
    with traversable(tmp_path):
        asyncio.run(_reip(guest_image, stack, tmp_path))


async def _reip(guest_image: GuestImage, stack: Stack, tmp_path: Path) -> None:
    vm, p = f"transcend-reip-{os.getpid()}", "reip"
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    with source_network(f"transcend-rip-{os.getpid() % 10000}") as net, \
            booted_guest(guest_image, tmp_path, vm, network=net,
                         root_files={"/etc/network/interfaces": IFUPDOWN}):
        m = wait_for_console(tmp_path / "console.log", rf"^{NET_MARKER} (\S+) (\S+)", 30)
        assert m.group(2) == "10.77.0.5/24", m.group(0)  # the source's own address
        # The rule is the protection's runbook rule for test failovers (the policy),
        # not the operation's: the test failover below gives none.
        spec = protection_spec(p, vm, src, dst)
        spec.policy = spec.policy.model_copy(update={"test_reip": [RULE]})
        await wait_first_point(await start_protection(client, spec))
        point = cat.latest_point(p)
        assert point is not None
        before = {d.disk: _sha256(d.location) for d in point.disks}

        # Test failover: the recovered guest configures the new address.
        health = HealthCheck(kind="console", pattern=rf"^{NET_MARKER} eth0 192\.168\.77\.5/24",
                             timeout_seconds=300)
        handle = await client.start_workflow(
            api.TEST_FAILOVER_WORKFLOW,
            api.TestFailoverInput(protection=p, point_id=point.id, health=health, keep_seconds=600),
            id=api.test_failover_id(p), task_queue=CONTROL_TASK_QUEUE,
            result_type=api.TestFailoverStatus)
        running = await wait_phase(handle, api.TestFailoverStatus, {"running", "failed"}, 900)
        assert running.phase == "running", running
        (recovered,) = running.vms
        assert any("/etc/network/interfaces: 10.77.0.5 -> 192.168.77.5" in x
                   for x in recovered.instance.prepared), recovered.instance.prepared
        console = Path(recovered.instance.console_log).read_text(errors="replace")
        configured = [ln for ln in console.splitlines() if ln.startswith(NET_MARKER)]
        assert configured == [f"{NET_MARKER} eth0 192.168.77.5/24"], configured
        await handle.signal("cleanup")
        await asyncio.wait_for(handle.result(), 300)
        assert {d.disk: _sha256(d.location) for d in point.disks} == before

        # Conversion forced on a guest virt-v2v cannot inspect: the failure is the
        # tool's own, nothing is left, the point is unchanged.
        with pytest.raises(WorkflowFailureError) as e:
            await client.execute_workflow(
                api.TEST_FAILOVER_WORKFLOW,
                api.TestFailoverInput(protection=p, point_id=point.id, keep_seconds=0,
                                      name="reip-conv", convert="always"),
                id=api.test_failover_id(p) + "-conv", task_queue=CONTROL_TASK_QUEUE)
        text = failure_text(e.value)
        assert "guest conversion failed (virt-v2v-in-place exit" in text, text
        assert "virt-v2v" in text.split("its log ends:", 1)[1], text
        assert "reip-conv" not in _domains()
        assert not (tmp_path / "replicas" / p / ".boot" / "reip-conv").exists()
        assert {d.disk: _sha256(d.location) for d in point.disks} == before


def test_auto_conversion_follows_the_connectors_guest_families() -> None:
    """``convert=auto`` converts a guest whose source platform needs other drivers than
    the target's, when the converter can produce the target's (virt-v2v: KVM only)."""
    from types import SimpleNamespace

    from activities.points import guest_prep_for

    kinds = {"esx": "vmware", "kvm1": "kvm", "kvm2": "kvm", "ec2": "aws"}
    ctx = SimpleNamespace(catalog=SimpleNamespace(
        get_platform=lambda name: SimpleNamespace(kind=kinds[name])))

    def converts(src: str, dst: str) -> bool:
        prep = guest_prep_for(ctx, src, dst, "auto", [])  # type: ignore[arg-type]
        return prep is not None and prep.convert

    assert converts("esx", "kvm1") and converts("ec2", "kvm1")
    assert not converts("kvm1", "kvm2")      # same drivers
    assert not converts("kvm1", "esx")       # virt-v2v cannot make a VMware guest
    assert not converts("kvm1", "ec2")

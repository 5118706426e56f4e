"""Power control of vSphere VMs (``PowerControl`` of the VMware Source): what failover
and migration use to shut the source down and failback to start the original.

A graceful shutdown is ``ShutdownGuest``: VMware Tools asks the guest OS to shut down
and the call returns at once (vSphere Web Services API, VirtualMachine.ShutdownGuest;
it faults with ``ToolsUnavailable`` when Tools is not running). The request is
repeated every ``REASK`` seconds until the VM is powered off or the timeout ends (a
guest that was still booting may have missed the first); then, with ``force``,
``PowerOffVM_Task`` cuts the power, as pulling the plug would.
"""

from __future__ import annotations

import time
from typing import Any

from pyVmomi import vim, vmodl

from connectors.base import ConnectorError, PowerState
from connectors.vmware.session import VsphereSession

POLL = 1.0
REASK = 30.0

_STATES: dict[str, PowerState] = {"poweredOn": "running", "poweredOff": "shutoff",
                                  "suspended": "paused"}


def power_state(s: VsphereSession, ref: str) -> PowerState:
    return _STATES.get(str(s.find_vm(ref).runtime.powerState), "unknown")


def power_on(s: VsphereSession, ref: str) -> None:
    vm = s.find_vm(ref)
    if vm.runtime.powerState != "poweredOn":
        s.wait(vm.PowerOnVM_Task(), f"powering on VM {vm.name!r}")


def power_off(s: VsphereSession, ref: str, timeout_seconds: float, force: bool) -> bool:
    """PowerControl.power_off: True when the VM was running."""
    vm = s.find_vm(ref)
    state = str(vm.runtime.powerState)
    if state == "poweredOff":
        return False
    was_running = state == "poweredOn"
    tools_missing = False
    if was_running:
        deadline = time.monotonic() + timeout_seconds
        asked_at: float | None = None
        while time.monotonic() < deadline:
            if vm.runtime.powerState == "poweredOff":
                return True
            if asked_at is None or time.monotonic() - asked_at >= REASK:
                tools_missing = not _ask_shutdown(vm)
                asked_at = time.monotonic()
            time.sleep(POLL)
        if vm.runtime.powerState == "poweredOff":
            return True
    if not force:
        why = (" (VMware Tools is not running, so the guest could not be asked)"
               if tools_missing else "")
        state_text = "is suspended" if state == "suspended" else \
            f"did not shut down within {timeout_seconds:.0f} s{why}"
        raise ConnectorError(f"VM {vm.name!r} {state_text}; shut it down yourself, or ask "
                             "for a forced power-off")
    s.wait(vm.PowerOffVM_Task(), f"powering off VM {vm.name!r}")
    return was_running


def _ask_shutdown(vm: Any) -> bool:
    """One ShutdownGuest; False when the guest cannot be asked (no Tools)."""
    try:
        vm.ShutdownGuest()
    except vim.fault.ToolsUnavailable:
        return False
    except vim.fault.InvalidPowerState:
        pass  # it went off meanwhile
    except vmodl.MethodFault as e:
        raise ConnectorError(f"asking the guest of VM {vm.name!r} to shut down failed: "
                             f"{getattr(e, 'msg', '') or e}") from e
    return True

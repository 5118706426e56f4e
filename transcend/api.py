"""Inputs, outputs and query results of the workflows and activities.

This module is the programmatic API (docs/workflow-api.md): other systems start
workflows by name with these models as JSON. Workflow names and ID patterns are
defined here too so the CLI, the client module and the docs agree.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from transcend.alerts import Alert
from transcend.guestprep import ReIpRule
from transcend.models import (
    ChangeKind,
    ChangeSummary,
    Checkpoint,
    DiskInfo,
    FrozenHandle,
    Health,
    Instance,
    Model,
    Name,
    PlatformInfo,
    ProtectionPolicy,
    ProtectionSpec,
    ProtectionState,
    RecoveryPoint,
    StagingHandle,
    Workload,
)

# Workflow type names: stable, part of the API.
REPLICATION_WORKFLOW = "Replication"
CYCLE_WORKFLOW = "Cycle"
VERIFY_WORKFLOW = "VerifyPoint"
BOOT_WORKFLOW = "BootPoint"
TEST_FAILOVER_WORKFLOW = "TestFailover"
RECOVER_VM_WORKFLOW = "RecoverVm"
PRODUCTION_VM_WORKFLOW = "ProductionVm"
FAILOVER_WORKFLOW = "Failover"
MIGRATION_WORKFLOW = "Migration"
FAILBACK_WORKFLOW = "Failback"

CONTROL_TASK_QUEUE = "transcend-control"


def replication_id(protection: str) -> str:
    return f"replication/{protection}"


def cycle_id_prefix(protection: str) -> str:
    return f"cycle/{protection}"


def schedule_id(protection: str) -> str:
    return f"rpo/{protection}"


def verify_id(point_id: str) -> str:
    return f"verify/{point_id}"


def boot_id(point_id: str, name: str) -> str:
    return f"boot/{point_id}/{name}"


def test_failover_id(protection: str) -> str:
    """One test failover per protection at a time (the workflow id enforces it)."""
    return f"test-failover/{protection}"


def failover_id(protection: str) -> str:
    """Failover and migration share one id per protection: never two at once."""
    return f"failover/{protection}"


def failback_id(protection: str) -> str:
    return f"failback/{protection}"


# --------------------------------------------------------------------------- test failover


class HealthCheck(Model):
    """How a recovered VM is judged up, from what its target platform says about it
    (the target connector's ``HealthProbe``; ``capabilities.health`` lists what it has).

    ``console``: the regex ``pattern`` appears on the VM's console output.
    ``agent``: the guest agent / tools report the guest up.
    ``tcp``: a TCP connection to ``port`` at the VM's address succeeds, from a worker
    of the target site.
    ``none``: the VM running is enough (RTO = time to a started VM).
    """

    kind: Literal["console", "agent", "tcp", "none"] = "console"
    pattern: str = Field(default="", max_length=500)
    port: int = Field(default=22, ge=1, le=65535, description="tcp: the port to probe")
    timeout_seconds: int = Field(default=600, ge=10, le=24 * 3600)

    @model_validator(mode="after")
    def _pattern(self) -> HealthCheck:
        if self.kind == "console":
            if not self.pattern:
                raise ValueError("a console health check needs a pattern (a regular expression)")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"health check pattern {self.pattern!r}: {e}") from None
        return self


class RunbookStep(Model):
    """A command run by a worker of the target site during a failover, migration or
    test failover: ``before-boot`` (a failure stops the operation, which is then
    undone) or ``after-boot`` (after the health checks; a failure is reported). It gets
    TRANSCEND_PROTECTION, TRANSCEND_OPERATION, TRANSCEND_POINT and TRANSCEND_VMS (the
    recovered VMs' names, after-boot) in its environment. Steps should be safe to run
    twice: a worker that dies while one runs makes Temporal run it again."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}$")
    command: list[str] = Field(min_length=1, description="argv; no shell unless you call one")
    when: Literal["before-boot", "after-boot"] = "after-boot"
    timeout_seconds: int = Field(default=300, ge=1, le=24 * 3600)
    continue_on_error: bool = False
    env: dict[str, str] = Field(default_factory=dict)


class RunbookInput(Model):
    step: RunbookStep
    protection: str
    operation: str
    point_id: str = ""
    vms: list[str] = Field(default_factory=list)


class StepResult(Model):
    name: str
    when: str
    ok: bool
    exit_code: int | None = Field(description="None when it timed out or could not start")
    timed_out: bool = False
    seconds: float
    stdout: str = Field(default="", description="the last 4,000 characters")
    stderr: str = Field(default="", description="the last 4,000 characters")


ConvertMode = Literal["auto", "always", "never"]
CONVERT_HELP = ("guest conversion with virt-v2v-in-place before the first boot: auto = when the "
                "source hypervisor differs from the target's (KVM target), always, never")
REIP_HELP = ("re-IP rules applied to the guest's static network configuration before the "
             "first boot (each address in from_cidr moves to the same offset in to_cidr)")


class BootTier(Model):
    """VMs of a consistency group booted together; the next tier starts once all of
    them passed their health check, and ``delay_seconds`` more."""

    vms: list[str] = Field(min_length=1)
    delay_seconds: int = Field(default=0, ge=0, le=3600)
    health: HealthCheck | None = Field(default=None, description="default: the operation's")


class TestFailoverInput(Model):
    protection: Name
    point_id: str | None = Field(default=None, description="default: the newest point")
    health: HealthCheck = Field(default_factory=lambda: HealthCheck(kind="none"))
    boot_order: list[BootTier] = Field(default_factory=list, description="groups: the tiers; "
                                       "default one tier per VM in the protection's order")
    runbook: list[RunbookStep] = Field(default_factory=list)
    convert: ConvertMode = Field(default="auto", description=CONVERT_HELP)
    reip: list[ReIpRule] = Field(default_factory=list, description=REIP_HELP)
    keep_seconds: int = Field(default=4 * 3600, ge=0, le=30 * 86400,
                              description="clean up by itself after this long (0: at once)")
    network: str = Field(default="", description="target network; empty: isolated")
    name: str = Field(default="", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                      description="VM name; default <protection>-test")


class TestFailoverReport(Model):
    """Sent to the protection's Replication workflow; shown by ``transcend status``."""

    point_id: str
    started_at: datetime
    healthy_at: datetime | None = None
    rto_seconds: float | None = None
    ok: bool
    error: str = ""


class RecoverVmInput(Model):
    """One VM of a point booted and health-checked (a child workflow of a test failover)."""

    point_id: str
    vm: str = Field(description="the workload's name in the protection")
    name: str
    network: str = ""
    isolated: bool = True
    health: HealthCheck
    target_platform: str
    target_queue: str
    convert: ConvertMode = "auto"
    reip: list[ReIpRule] = Field(default_factory=list)


class RecoveredVm(Model):
    vm: str
    instance: Instance
    booted_at: datetime
    healthy_at: datetime


class TestFailoverStatus(Model):
    protection: str
    phase: Literal["choosing", "runbook", "booting", "health-check", "running", "cleaning", "done",
                   "failed"]
    point_id: str | None = None
    instance: Instance | None = None
    vms: list[RecoveredVm] = Field(default_factory=list, description="in boot order")
    tier: int = 0
    steps: list[StepResult] = Field(default_factory=list, description="runbook steps run")
    started_at: datetime | None = None
    rto_seconds: float | None = None
    error: str = ""


class RtoSample(Model):
    """A measured RTO, for the metrics (``metrics.rto``)."""

    protection: str
    seconds: float


class HealthInput(Model):
    instance: Instance
    health: HealthCheck


class DestroyInput(Model):
    point_id: str
    instance: Instance


# --------------------------------------------------------------------------- replication


class ReplicationInput(Model):
    """Start protecting: ``spec`` registers the protection (idempotent for the same spec);
    ``protection`` alone resumes an existing one. ``carry`` is internal state handed over
    by continue-as-new."""

    protection: Name
    spec: ProtectionSpec | None = None
    carry: ReplicationCarry | None = None


class CycleOutcome(Model):
    cycle_id: str
    status: Literal["committed", "failed", "skipped"]
    point_id: str | None = None
    instant: datetime | None = None
    committed_at: datetime | None = None
    kind: str = ""
    bytes_written: int = 0
    copy_seconds: float = 0.0
    wall_seconds: float = 0.0
    rpo_seconds: float | None = None
    error: str = ""


class ReplicationCarry(Model):
    cycles_ok: int = 0
    cycles_failed: int = 0
    consecutive_failures: int = 0
    last_point_id: str | None = None
    last_point_instant: datetime | None = None
    recent_rpo: list[float] = Field(default_factory=list)
    recent_cycle_seconds: list[float] = Field(default_factory=list)
    last_error: str = ""
    paused: bool = False
    interval_seconds: int = 0
    test_failovers: list[TestFailoverReport] = Field(default_factory=list, description="newest last")
    dr_state: ProtectionState | None = Field(default=None, description="failing over, failed "
                                             "over or failing back; None when protecting")
    dr_reason: str = ""
    alerted: Literal["rpo_breached", "cycle_failing"] | None = Field(
        default=None, description="the health problem last alerted; health_recovered clears it")
    pending_alerts: list[Alert] = Field(default_factory=list, description="not yet delivered "
                                        "when the run continued as new; the next run sends them")
    protected_since: datetime | None = Field(
        default=None, description="when replication started: test failovers are due from then")
    drill_alerted_due: datetime | None = Field(
        default=None, description="the test-failover due time last alerted as overdue (once per due time)")


class ReplicationStatus(Model):
    protection: str
    state: ProtectionState
    health: Health
    health_reason: str
    rpo_target_seconds: int
    rpo_last_seconds: float | None
    rpo_p95_seconds: float | None
    last_point_id: str | None
    last_point_instant: datetime | None
    cycles_ok: int
    cycles_failed: int
    schedule_interval_seconds: int
    current_cycle: str | None
    last_error: str
    last_test_failover: TestFailoverReport | None = None
    test_failover_due_at: datetime | None = Field(
        default=None, description="when the next successful test failover is due (policy "
                                  "test_failover_every_seconds); None when no cadence is set")
    test_failover_overdue: bool = False


class PolicyChange(Model):
    policy: ProtectionPolicy


# --------------------------------------------------------------------------- cycle


class CycleInput(Model):
    protection: Name
    force_resync: bool = False
    # The last cycle of a failover or migration: runs while the protection is
    # failing over, and may read a shut-off source (a migration shut it down first).
    final: bool = False


class CycleContext(Model):
    protection: str
    cycle_id: str
    source: PlatformInfo
    target: PlatformInfo
    source_queue: str
    target_queue: str
    workloads: list[Workload]
    policy: ProtectionPolicy
    last_point: RecoveryPoint | None
    state: ProtectionState
    force_resync: bool = False
    final: bool = False
    started_at: datetime


class StreamInput(Model):
    ctx: CycleContext
    frozen: FrozenHandle
    staging: StagingHandle
    disk: str
    block_size: int


class StreamResult(Model):
    disk: str
    kind: ChangeKind
    bytes_read: int = Field(description="read by every attempt (a killed attempt's as far "
                                        "as its last progress record says)")
    bytes_written: int = Field(description="written by every attempt: the disk's changed "
                                           "data plus bytes_resent")
    bytes_zero: int
    bytes_skipped: int
    bytes_total: int
    seconds: float
    resumed_from: int = 0
    bytes_resent: int = Field(
        default=0, description="bytes moved again (written; read in a pull) because an "
                               "earlier attempt failed before they were durable (as counted "
                               "by its last progress record)")
    attempt_bytes_read: int | None = Field(
        default=None, description="read by the attempt that completed (None: a result of "
                                  "an older worker, whose bytes_read was only that)")
    attempt_bytes_written: int | None = None
    manifest_file: str
    manifest_sha256: str = Field(
        default="", description="sha256 of the raw manifest the stream staged (packed): "
        "commit stores the staged bytes as they are; empty from older workers")


class VerifySampleInput(Model):
    staging: StagingHandle
    ctx: CycleContext
    disk: str
    block_size: int
    seed: int
    blocks: int


class VerifySampleResult(Model):
    disk: str
    blocks_checked: int
    mismatches: list[int] = Field(default_factory=list)


class CommitInput(Model):
    ctx: CycleContext
    frozen: FrozenHandle
    staging: StagingHandle
    block_size: int
    streams: list[StreamResult]
    checkpoints: list[Checkpoint] | None = Field(
        default=None, description="the source checkpoints source.freeze reported (None: an "
                                  "older worker froze; the commit asks the source connector)")


class FreezeResult(Model):
    frozen: FrozenHandle
    changes: list[ChangeSummary]
    checkpoints: list[Checkpoint] | None = Field(
        default=None, description="what becomes current on commit (Frozen.new_checkpoints), "
                                  "taken at the source site so the target site's commit needs "
                                  "no source connector")


class BeginInput(Model):
    ctx: CycleContext
    disks: list[DiskInfo]


class ReleaseInput(Model):
    ctx: CycleContext
    frozen: FrozenHandle
    committed: bool


class AbortInput(Model):
    ctx: CycleContext
    staging: StagingHandle


class RetentionResult(Model):
    deleted: list[str] = Field(default_factory=list)
    busy: list[str] = Field(default_factory=list)
    kept: int = 0


class CycleRecordInput(Model):
    ctx: CycleContext
    outcome: CycleOutcome
    bytes_read: int = 0
    bytes_zero: int = 0
    bytes_skipped: int = 0
    bytes_resent: int = 0


# --------------------------------------------------------------------------- schedules


class ScheduleInput(Model):
    protection: str
    interval_seconds: int = Field(ge=1)
    paused: bool = False
    trigger_now: bool = False
    search_attributes: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- verify / boot


class VerifyInput(Model):
    point_id: str


class VerifyResult(Model):
    point_id: str
    disks: dict[str, int] = Field(description="blocks checked per disk")
    mismatched_blocks: dict[str, list[int]] = Field(default_factory=dict)
    ok: bool
    bytes_read: dict[str, int] = Field(
        default_factory=dict, description="bytes read per disk: what the point holds; ranges "
        "its export reports as reading zeros are checked against the zero-block hash unread")


class BootInput(Model):
    point_id: str
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    network: str = ""
    isolated: bool = True
    vm: str = Field(default="", description="which VM of a group point (default the first)")
    convert: ConvertMode = "auto"
    reip: list[ReIpRule] = Field(default_factory=list)


class BootResult(Model):
    point_id: str
    instance_id: str
    name: str
    console_log: str
    prepared: list[str] = Field(default_factory=list)


class ProtectionView(Model):
    """What ``cycle.start`` needs of the catalog, for the workflow's first steps."""

    protection: str
    state: ProtectionState
    policy: ProtectionPolicy
    source: PlatformInfo
    target: PlatformInfo


class RegisterPlan(Model):
    spec: ProtectionSpec
    source: PlatformInfo
    target: PlatformInfo
    exists: bool = False


class RegisterWorkloads(Model):
    plan: RegisterPlan
    workloads: list[Workload]


class StateChange(Model):
    protection: str
    state: ProtectionState
    health: Health
    reason: str = ""


class PolicyUpdate(Model):
    protection: str
    policy: ProtectionPolicy


class PauseInput(Model):
    protection: str
    paused: bool


class Checkpoints(Model):
    items: list[Checkpoint]


ReplicationInput.model_rebuild()


# --------------------------------------------------------------------------- failover, migration, failback

VM_NAME = r"^$|^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class FailoverInput(Model):
    """Fail a protection over to its target (``Failover``), or migrate it (``Migration``:
    planned, the source is shut down cleanly first and nothing it wrote is lost)."""

    protection: Name
    planned: bool = Field(default=False, description="set by the Migration workflow")
    point_id: str | None = Field(default=None, description="default: the newest point "
                                 "(after the final cycle)")
    final_cycle: bool = Field(default=True, description="replicate once more first when "
                              "the source still answers (Failover only)")
    shutdown_source: bool = Field(default=True, description="shut the source VM down "
                                  "(Failover only; Migration always does)")
    shutdown_timeout_seconds: int = Field(default=300, ge=10, le=3600)
    force_off: bool = Field(default=True, description="power the source off when it does not "
                            "shut down within the timeout (a Migration never forces)")
    name: str = Field(default="", pattern=VM_NAME, description="production VM name at the "
                      "target; default the source VM's name (with -dr on the same host). "
                      "For a group, a prefix: <name>-<VM>")
    network: str = Field(default="", description="production network at the target; default "
                         "the source NICs' networks")
    health: HealthCheck = Field(default_factory=lambda: HealthCheck(kind="none"))
    boot_order: list[BootTier] = Field(default_factory=list, description="groups: the tiers; "
                                       "default one tier per VM in the protection's order. "
                                       "Sources shut down in the reverse order")
    runbook: list[RunbookStep] = Field(default_factory=list)
    convert: ConvertMode = Field(default="auto", description=CONVERT_HELP)
    reip: list[ReIpRule] = Field(default_factory=list, description=REIP_HELP)


class FailoverPlan(Model):
    """What ``failover.check`` found: everything the workflow needs, nothing changed yet."""

    protection: str
    source: PlatformInfo
    target: PlatformInfo
    workloads: list[Workload]
    names: dict[str, str] = Field(description="VM (workload name) -> production name at the target")
    tiers: list[BootTier]
    previous_state: ProtectionState = ProtectionState.PROTECTING

    def workload(self, vm: str) -> Workload:
        return next(w for w in self.workloads if w.name == vm)


class FailoverAbort(Model):
    """Undo a failover that did not reach the boot: state and schedule as before, the
    source started again when the failover shut it down."""

    protection: str
    previous_state: ProtectionState
    restart_vms: list[str] = Field(default_factory=list, description="source VMs (platform ids) "
                                   "the failover shut down, started again")


class SourcePower(Model):
    platform: str
    vm: str
    timeout_seconds: int = 300
    force: bool = False


class ProductionBoot(Model):
    protection: str
    point_id: str
    vm: str = Field(default="", description="the workload's name; empty: the only one")
    name: str
    network: str = ""
    planned: bool
    final_cycle: str = ""
    source_was_running: bool = True
    convert: ConvertMode = "auto"
    reip: list[ReIpRule] = Field(default_factory=list)


class ProductionVmInput(Model):
    """One VM of a failover booted as production and health-checked (a child workflow
    of Failover/Migration, one per VM, so a group's VMs show, retry and fail separately)."""

    boot: ProductionBoot
    health: HealthCheck
    target_queue: str


class FailedOverVm(Model):
    """One VM of a failed-over protection: the production VM at the target and its
    original, with the failback's progress for it."""

    vm: str = Field(description="the workload's name in the protection")
    source_vm: str = Field(description="the original VM (platform id)")
    instance: Instance
    source_was_running: bool = True
    # failback progress: the failed-over VM's checkpoint the next pass starts from, and
    # whether the original's own changes after the point were already overwritten
    failback_checkpoint: str = Field(default="", description="before per-disk checkpoints: "
                                     "one token for every disk (records of older versions)")
    failback_checkpoints: list[Checkpoint] = Field(
        default_factory=list, description="the failed-over VM's tracking tokens the next "
        "pass reads from (what its Source's new_checkpoints() returned)")
    original_synced: bool = False


class FailoverRecord(Model):
    """Kept in the catalog while a protection is failed over (what failback needs). The
    VMs are in boot order; a group whose later tiers did not boot lists only those that
    did (the failover stands from the first production boot)."""

    protection: str
    point_id: str
    planned: bool
    failed_over_at: datetime
    final_cycle: str = Field(default="", description="outcome of the final cycle")
    vms: list[FailedOverVm] = Field(min_length=1)

    @property
    def instance(self) -> Instance:
        """The first production VM (the only one outside groups)."""
        return self.vms[0].instance

    def vm(self, name: str) -> FailedOverVm:
        if not name:
            return self.vms[0]
        for v in self.vms:
            if v.vm == name:
                return v
        raise KeyError(f"VM {name!r} was not failed over; failed over: "
                       f"{', '.join(v.vm for v in self.vms)}")


class FailoverStatus(Model):
    protection: str
    planned: bool = False
    phase: Literal["checking", "pausing", "final-cycle", "shutdown-source", "runbook", "booting",
                   "health-check", "done", "compensating", "failed"] = "checking"
    point_id: str | None = None
    final_cycle: str = ""
    instance: Instance | None = Field(default=None, description="the first production VM")
    vms: list[RecoveredVm] = Field(default_factory=list, description="every VM booted, "
                                   "in boot order, with when it booted and passed its check")
    tier: int = Field(default=0, description="the boot tier being booted")
    started_at: datetime | None = None
    rto_seconds: float | None = None
    error: str = ""
    steps: list[StepResult] = Field(default_factory=list, description="runbook steps run")


class FailbackInput(Model):
    """Bring a failed-over protection home: sync the failed-over VM back into the
    original VM's disks (only what changed), then a planned migration back."""

    protection: Name
    migrate_now: bool = Field(default=True, description="shut the failed-over VM down and "
                              "migrate back after the first pass; else keep syncing until "
                              "the `migrate` signal")
    sync_interval_seconds: int = Field(default=300, ge=10, le=86400)
    shutdown_timeout_seconds: int = Field(default=300, ge=10, le=3600)
    start_original: bool = True
    keep_failed_over: bool = Field(default=False, description="leave the failed-over VM "
                                   "defined (shut off) instead of removing it")
    verify: bool = Field(default=True, description="compare both disks' hashes before the "
                         "original is started")


class FailbackPass(Model):
    """One sync of the failed-over VM into the original VM's disks."""

    protection: str
    vm: str = ""
    final: bool
    mode: Literal["tracked", "hash-compare"] = "tracked"
    failed_over_bytes: int = 0
    original_bytes: int = 0
    bytes_written: int = Field(default=0, description="data written into the original disks")
    bytes_zeroed: int = Field(default=0, description="written as zeroes (no data sent)")
    bytes_read: int = 0
    bytes_skipped: int = Field(default=0, description="hash-compare: read, equal, not written")
    disk_size: int = 0
    seconds: float = 0.0
    checkpoint: str = ""


class FailbackSyncInput(Model):
    protection: str
    vm: str = Field(default="", description="the workload's name; empty: the only one")
    final: bool = False


class FailbackServed(Model):
    """A failback pass between sites: the failed-over VM frozen at the target site, its
    disks served over TLS (``frozen.remote``), its extents staged in the catalog under
    ``failback-<pass_id>``."""

    protection: str
    vm: str
    final: bool = False
    pass_id: str
    frozen: FrozenHandle
    checkpoints: list[Checkpoint] = Field(
        default_factory=list, description="the frozen instant's new tracking tokens, "
        "recorded by the pull when its pass is written")


class FailbackReleaseInput(Model):
    served: FailbackServed
    committed: bool


class FailbackHashes(Model):
    """sha256 of each VM's disks on one side, in domain order."""

    side: Literal["original", "failed-over"]
    disks: dict[str, list[tuple[str, str]]] = Field(
        default_factory=dict, description="VM name -> [(disk, sha256)]")

    def differences(self, failed_over: FailbackHashes) -> list[str]:
        """What differs from the failed-over side (disks paired in domain order)."""
        diffs = []
        for vm, disks in self.disks.items():
            other = failed_over.disks.get(vm, [])
            if len(other) != len(disks):
                diffs.append(f"{vm}: {len(disks)} disks on the original, {len(other)} failed over")
                continue
            for (disk, hx), (_, hy) in zip(disks, other, strict=True):
                if hx != hy:
                    diffs.append(f"{vm} {disk}: original {hx[:16]} != failed-over {hy[:16]}")
        return diffs


class FailbackFinishInput(Model):
    protection: str
    start_original: bool = True
    keep_failed_over: bool = False


class FailbackVerify(Model):
    protection: str
    identical: bool
    detail: str = ""


class FailbackStatus(Model):
    protection: str
    phase: Literal["checking", "syncing", "waiting", "shutdown-failed-over", "final-sync",
                   "verify", "restoring", "done", "failed"] = "checking"
    passes: list[FailbackPass] = Field(default_factory=list)
    bytes_written: int = 0
    error: str = ""


class DrStateSignal(Model):
    """Failover/failback tell the Replication workflow what happened to its protection."""

    state: ProtectionState
    reason: str = ""


# Each workflow type's input model. A payload that does not validate as it fails the
# workflow at once with a non-retryable ``InvalidInput`` naming the field
# (transcend/converter.py), instead of failing its workflow task forever.
# tests/test_workflow_input.py checks that every registered workflow is listed here.
WORKFLOW_INPUTS: dict[str, type[Model]] = {
    REPLICATION_WORKFLOW: ReplicationInput,
    CYCLE_WORKFLOW: CycleInput,
    VERIFY_WORKFLOW: VerifyInput,
    BOOT_WORKFLOW: BootInput,
    TEST_FAILOVER_WORKFLOW: TestFailoverInput,
    RECOVER_VM_WORKFLOW: RecoverVmInput,
    PRODUCTION_VM_WORKFLOW: ProductionVmInput,
    FAILOVER_WORKFLOW: FailoverInput,
    MIGRATION_WORKFLOW: FailoverInput,
    FAILBACK_WORKFLOW: FailbackInput,
}

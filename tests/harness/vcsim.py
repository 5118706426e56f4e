"""govmomi's vCenter simulator with transcend's disk, snapshot and CBT model.

The launcher (``tests/harness/vcsim_go``) is built once per source hash from
Debian's ``golang-go`` and ``golang-github-vmware-govmomi-dev`` in GOPATH mode
(no module downloads) and cached under /var/cache/transcend-test-vcsim/::

    from tests.harness.vcsim import vcsim

    with vcsim(tmp_path) as sim:
        si = sim.connect()                  # pyVmomi ServiceInstance, thumbprint-pinned
        sim.set_page_limit(2)
        sim.inject_fault("CreateSnapshot_Task", "SnapshotFault", vm="vm1")
        sim.disk_files("vm1")               # current backing file per device key
        sim.cbt_reset("vm1")

The simulator runs as a child process (own session) and is stopped with SIGTERM,
then SIGKILL, when the ``with`` block ends, also on failure. See
tests/harness/vcsim_go/README.md for the model and its sources.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.harness.procs import command_lines

__all__ = ["VcSim", "VcsimBuildError", "build_vcsim", "vcsim"]

SRC_DIR = Path(__file__).resolve().parent / "vcsim_go"
GOVMOMI_SRC = Path("/usr/share/gocode/src/github.com/vmware/govmomi/simulator")
CACHE_ROOT = Path(os.environ.get("TRANSCEND_VCSIM_CACHE", "/var/cache/transcend-test-vcsim"))
READY_TIMEOUT = 30.0
BUILD_TIMEOUT = 600


class VcsimBuildError(RuntimeError):
    """The launcher could not be built (names the missing Debian package when that is why)."""


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(SRC_DIR.glob("*.go")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    # the toolchain and the govmomi package are inputs too
    for marker in (Path("/usr/lib/go/VERSION"), GOVMOMI_SRC / "simulator.go"):
        with contextlib.suppress(OSError):
            h.update(marker.read_bytes())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    try:
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        if os.access(CACHE_ROOT, os.W_OK):
            return CACHE_ROOT
    except OSError:
        pass
    fallback = Path.home() / ".cache" / "transcend-test-vcsim"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def build_vcsim() -> Path:
    """Build the launcher (once per source hash) and return the binary's path."""
    go = shutil.which("go") or ("/usr/lib/go/bin/go" if Path("/usr/lib/go/bin/go").exists() else None)
    if go is None:
        raise VcsimBuildError("the Go toolchain is missing: install the Debian package golang-go")
    if not GOVMOMI_SRC.is_dir():
        raise VcsimBuildError(
            f"govmomi's simulator sources are missing ({GOVMOMI_SRC}): "
            "install the Debian package golang-github-vmware-govmomi-dev"
        )
    root = _cache_root()
    digest = _source_hash()
    out_dir = root / digest
    binary = out_dir / "vcsim"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():  # built by a concurrent session while we waited
            return binary
        gopath = Path(tempfile.mkdtemp(prefix="gopath-", dir=out_dir))
        try:
            pkg = gopath / "src" / "vcsim-transcend"
            pkg.mkdir(parents=True)
            for p in SRC_DIR.glob("*.go"):
                shutil.copy2(p, pkg / p.name)
            env = {k: v for k, v in os.environ.items() if k not in ("GOFLAGS", "GOPATH", "GO111MODULE")}
            env.update(
                GO111MODULE="off",
                GOPATH=f"{gopath}:/usr/share/gocode",
                GOCACHE=str(root / "gocache"),
                GOPROXY="off",
                CGO_ENABLED="0",
            )
            tmp = out_dir / f"vcsim.tmp.{os.getpid()}"
            proc = subprocess.run(
                [go, "build", "-o", str(tmp), "."],
                cwd=pkg, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
            )
            if proc.returncode != 0:
                raise VcsimBuildError(_explain_build_failure(proc.stderr))
            os.replace(tmp, binary)
        finally:
            shutil.rmtree(gopath, ignore_errors=True)
    return binary


def _explain_build_failure(stderr: str) -> str:
    msg = f"building the vcsim launcher failed:\n{stderr.strip()}"
    missing = [ln.split('"')[1] for ln in stderr.splitlines() if "cannot find package" in ln and '"' in ln]
    if missing:
        msg += (
            "\nmissing Go packages: " + ", ".join(sorted(set(missing)))
            + "\nthey come from Debian golang-*-dev packages (golang-github-vmware-govmomi-dev and its"
            " dependencies); find the one providing each with `apt-file search` or"
            " `apt-cache search golang-<name>-dev` and install it"
        )
    return msg


@dataclass
class VcSim:
    """A running simulator. ``url`` is the SOAP endpoint (https://127.0.0.1:PORT/sdk)."""

    url: str
    host: str
    port: int
    user: str
    password: str
    thumbprint: str
    datacenter: str
    cluster: str
    datastore: str
    dir: Path
    control_url: str
    cert_file: Path
    log_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    # ---------------------------------------------------------------- control API

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None,
                 params: dict[str, str] | None = None) -> Any:
        r = requests.request(method, f"{self.control_url}/{path}", json=body, params=params,
                             verify=str(self.cert_file), timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"vcsim control {method} {path}: {r.status_code} {r.text.strip()}")
        return r.json()

    def inject_fault(self, method: str, fault: str, *, vm: str | None = None, count: int = 1,
                     message: str | None = None, fields: dict[str, Any] | None = None) -> None:
        """Make the next ``count`` calls of SOAP ``method`` (optionally only on ``vm``, by
        moref value or name) fail with vim25 fault ``fault``; ``*_Task`` methods return a
        task that ends in that error, other methods a SOAP fault."""
        body: dict[str, Any] = {"method": method, "fault": fault, "count": count}
        if vm is not None:
            body["vm"] = vm
        if message is not None:
            body["message"] = message
        if fields is not None:
            body["fields"] = fields
        self._control("POST", "fault", body)

    def clear_faults(self) -> None:
        self._control("DELETE", "fault")

    def cbt_reset(self, vm: str) -> list[dict[str, Any]]:
        """Reset CBT on the VM's disks (a new epoch: every earlier changeId is rejected)."""
        result: list[dict[str, Any]] = self._control("POST", "cbt-reset", {"vm": vm})
        return result

    def set_page_limit(self, n: int) -> None:
        """At most ``n`` changedArea entries per QueryChangedDiskAreas reply."""
        self._control("POST", "page-limit", {"limit": n})

    def set_free_space(self, free: int | None) -> None:
        """Override the datastore's free space (None: back to the real file system's)."""
        self._control("POST", "datastore", {"freeSpace": free})

    def disk_info(self, vm: str) -> dict[str, Any]:
        info: dict[str, Any] = self._control("GET", "disks", params={"vm": vm})
        return info

    def disk_files(self, vm: str) -> dict[int, Path]:
        """Device key → the data file of the disk's current backing (write here to act as the guest)."""
        return {int(d["key"]): Path(d["path"]) for d in self.disk_info(vm)["disks"]}

    # ---------------------------------------------------------------- clients

    def connect(self, user: str | None = None, password: str | None = None) -> Any:
        """A pyVmomi ServiceInstance, certificate pinned by thumbprint."""
        from pyVim.connect import SmartConnect

        return SmartConnect(host=self.host, port=self.port, user=user or self.user,
                            pwd=self.password if password is None else password,
                            thumbprint=self.thumbprint)

    def folder_url(self, ds_path: str) -> str:
        """/folder URL of a datastore path ("[ds] vm/disk-flat.vmdk" or "vm/disk-flat.vmdk")."""
        rel = ds_path.split("] ", 1)[1] if ds_path.startswith("[") else ds_path
        return (f"https://{self.host}:{self.port}/folder/{requests.utils.quote(rel)}"
                f"?dcPath={requests.utils.quote(self.datacenter)}&dsName={requests.utils.quote(self.datastore)}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def vcsim(workdir: Path, *, user: str = "administrator@vsphere.local", password: str = "Vcsim-pass1",
          datastore: str = "datastore1", page_limit: int = 64) -> Iterator[VcSim]:
    """Start the simulator with its datastore in ``workdir/datastore``; stop it on exit."""
    binary = build_vcsim()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ds_dir = workdir / "datastore"
    ds_dir.mkdir(exist_ok=True)
    ready = workdir / "vcsim-ready.json"
    ready.unlink(missing_ok=True)
    cert = workdir / "vcsim-cert.pem"
    log_path = workdir / "vcsim.log"
    env = dict(os.environ, VCSIM_PASSWORD=password)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(binary), "--datastore-dir", str(ds_dir), "--datastore-name", datastore,
             "--user", user, "--ready-file", str(ready), "--cert-file", str(cert),
             "--page-limit", str(page_limit)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    sim: VcSim | None = None
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(
                    f"vcsim exited with {proc.returncode} before it was ready; log: {log_path}\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vcsim not ready after {READY_TIMEOUT:.0f}s; log: {log_path}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        sim = VcSim(
            url=info["url"], host=info["host"], port=int(info["port"]), user=info["user"],
            password=info["password"], thumbprint=info["thumbprint"], datacenter=info["datacenter"],
            cluster=info["cluster"], datastore=info["datastore"], dir=Path(info["datastore_dir"]),
            control_url=info["control_url"], cert_file=cert, log_path=log_path, proc=proc,
        )
        yield sim
    finally:
        if sim is not None:
            sim.stop()
        elif proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# ---------------------------------------------------------------- VMs in the simulator

_names = itertools.count(1)


def find(si: Any, kind: type) -> Any:
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [kind], True)
    try:
        return view.view[0]
    finally:
        view.Destroy()


def create_vm(si: Any, sim: VcSim, *, size: int = 64 << 20, thin: bool = True, cbt: bool = False,
              name: str | None = None) -> Any:
    """A VM with one LSI Logic controller and one disk of ``size`` bytes."""
    name = name or f"vm{next(_names)}-{os.getpid()}"
    dc = find(si, vim.Datacenter)
    cluster = find(si, vim.ClusterComputeResource)
    ctrl = vim.vm.device.VirtualDeviceSpec(
        operation="add",
        device=vim.vm.device.VirtualLsiLogicController(key=1000, busNumber=0, sharedBus="noSharing"),
    )
    disk = vim.vm.device.VirtualDeviceSpec(
        operation="add", fileOperation="create",
        device=vim.vm.device.VirtualDisk(
            key=-1, controllerKey=1000, unitNumber=0, capacityInKB=size // 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{sim.datastore}]", diskMode="persistent", thinProvisioned=thin),
        ),
    )
    spec = vim.vm.ConfigSpec(
        name=name, memoryMB=64, numCPUs=1, guestId="otherGuest64",
        files=vim.vm.FileInfo(vmPathName=f"[{sim.datastore}]"),
        deviceChange=[ctrl, disk], changeTrackingEnabled=cbt or None,
    )
    task = dc.vmFolder.CreateVM_Task(config=spec, pool=cluster.resourcePool)
    WaitForTask(task)
    return task.info.result


def the_disk(obj: Any) -> Any:
    """The VM's (or snapshot config's) only virtual disk."""
    hw = obj.config.hardware
    return next(d for d in hw.device if isinstance(d, vim.vm.device.VirtualDisk))


def snapshot(vm: Any, name: str) -> Any:
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
    WaitForTask(task)
    return task.info.result


def remove(snap: Any) -> None:
    WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))


def current_file(sim: VcSim, vm: Any) -> Path:
    files = sim.disk_files(vm._moId)
    assert len(files) == 1
    return next(iter(files.values()))


def write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot_names(vm: Any) -> list[str]:
    """Names of the VM's snapshots, parents before children."""
    out: list[str] = []

    def walk(trees: Any) -> None:
        for t in trees or []:
            out.append(t.name)
            walk(t.childSnapshotList)

    walk(vm.snapshot.rootSnapshotList if vm.snapshot else None)
    return out


@contextlib.contextmanager
def vcsim_session(workdir: Path) -> Iterator[tuple[VcSim, Any]]:
    """A simulator and a pyVmomi session to it; its log is printed when the body fails."""
    from pyVim.connect import Disconnect

    with vcsim(workdir) as sim:
        si = sim.connect()
        try:
            yield sim, si
        except BaseException:
            print(sim.log_tail())
            raise
        finally:
            Disconnect(si)


def leftover_servers() -> list[str]:
    """Command lines of NBD servers the VMware connectors started (private directories
    under /tmp/tvmw-*) that are still running: each should stop with its activity."""
    return [cmd for cmd in command_lines().values()
            if "/tmp/tvmw-" in cmd and ("nbdkit" in cmd or "qemu-nbd" in cmd)]

"""Replication across sites: NBD over TLS in "push" mode (docs/sites.md).

Two parts:

* Without namespaces: the KVM target's staging export over TCP with TLS
  (``KvmTarget.begin_remote``) against real qemu-nbd, libnbd (blockstream) and
  certificates from transcend/pki.py: a writer with its own site's client
  certificate copies into it, a stranger is refused with an error naming TLS, other
  processes find the export again (pid file) and restart it on the same port.
* Two sites in network namespaces (tests/harness/netns.py): worker A (site ``a``,
  the KVM source) in namespace a and worker B (site ``b``, the KVM target) in
  namespace b, each with its own ``$TRANSCEND_HOME`` (and so its own certificate
  directory ``<home>/pki/sites/<site>``) and ``TRANSCEND_SITE_ADDRESS`` = its
  address on the site link; one catalog (an SQLite file both reach) and the dev
  server on the host address. libvirtd's unix socket serves both (site a reads the
  running guest with a pull-mode backup, site b keeps the replica). The only path
  between the namespaces is the site link, so the copy's bytes must cross it:
  its veth counters are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import libvirt
import pytest
from temporalio.client import Client, WorkflowHandle

import blockstream
from connectors.base import ChangeExtent, ChangeSet
from connectors.common.qemu import export_sha256
from connectors.kvm.target import KvmTarget
from temporal.devserver import DevServer, free_port, start_dev_server
from tests.harness.dr import remove_domain
from tests.harness.guest import BOOT_MARKER, GuestImage
from tests.harness.libvirtd import DiskSpec, traversable, wait_for_console
from tests.harness.netns import NamespacesUnavailable, Site, TwoSites, two_sites
from tests.harness.protect import (
    booted_guest,
    images_identical,
    point_path,
    protection_spec,
    start_protection,
    status,
    sync_now,
    verify_point,
    wait_first_point,
    wait_for,
)
from tests.harness.records import check_contiguous, read_records
from transcend import api, nbdtls, pki, pullexport
from transcend.api import (
    CONTROL_TASK_QUEUE,
    CYCLE_WORKFLOW,
    HealthCheck,
    ReplicationStatus,
    StreamResult,
)
from transcend.catalog import Catalog
from transcend.client import codec_keys, connect
from transcend.config import Settings, load_settings
from transcend.models import (
    ChangeKind,
    ChangeSummary,
    DiskInfo,
    FrozenHandle,
    NbdEndpoint,
    PlatformInfo,
    PlatformKind,
    PlatformSpec,
    PointMeta,
    ProtectionPolicy,
    ProtectionSpec,
    ProtectionState,
    RecoveryPoint,
    effective_transfer,
)
from transcend.secrets import SecretBox

REPO = Path(__file__).resolve().parents[1]
XS_BOOTED = rf"^{BOOT_MARKER} seq=(\d+)"
MiB = 1 << 20
BS = 65536

needs_qemu = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-nbd", "nbdcopy")),
    reason="needs qemu-utils and libnbd-bin")


# =========================================================================== without namespaces


@pytest.fixture(scope="module")
def pki_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA; site b serves on 127.0.0.1, site a dials it."""
    base = tmp_path_factory.mktemp("xs-pki")
    pki.init_ca(base, "transcend cross-site test CA", days=2)
    pki.issue_site(base, "b", ips=["127.0.0.1"], days=1)
    pki.issue_site(base, "a", ips=["127.0.0.2"], days=1)
    return base


def _stranger(tmp: Path, good: Path, site: str) -> Path:
    """A bundle that trusts ``good``'s CA but holds a client certificate of another CA
    (the server must refuse it: verify-peer)."""
    other = tmp / "other-ca"
    if not (other / "ca").exists():
        pki.init_ca(other, "some other CA", days=2)
    pki.issue_site(other, site, ips=["127.0.0.2"], days=1, force=True)
    d = tmp / f"stranger-{site}"
    d.mkdir(exist_ok=True)
    shutil.copy(good / "sites" / site / pki.CA_CERT, d)
    for f in (pki.CLIENT_CERT, pki.CLIENT_KEY):
        shutil.copy(other / "sites" / site / f, d)
    return d


def _settings(site: str, home: Path, tls_dir: Path | None = None, address: str = "127.0.0.1",
              ports: tuple[int, int] = (10810, 10999)) -> Settings:
    return Settings(home=home, site=site, site_address=address, nbd_port_min=ports[0],
                    nbd_port_max=ports[1], nbd_tls_dir=str(tls_dir) if tls_dir else "")


def test_transfer_mode_follows_the_sites() -> None:
    from activities.cycle import check_pull_source, check_transfer
    from connectors.base import PermanentError

    auto = ProtectionPolicy(rpo_seconds=60)
    assert auto.transfer == "auto"
    assert effective_transfer(auto, "a", "a") == "local"
    assert effective_transfer(auto, "a", "b") == "push"
    push = ProtectionPolicy(rpo_seconds=60, transfer="push")
    assert effective_transfer(push, "a", "a") == "push"
    local = ProtectionPolicy(rpo_seconds=60, transfer="local")
    assert effective_transfer(local, "a", "b") == "local"
    check_transfer("local", "a", "a")
    with pytest.raises(PermanentError, match=r"'local'.*site 'a'.*site 'b'.*push"):
        check_transfer("local", "a", "b")
    pull = ProtectionPolicy(rpo_seconds=60, transfer="pull")
    assert effective_transfer(pull, "a", "b") == "pull"
    check_transfer("pull", "a", "b")
    with pytest.raises(ValueError, match="transfer"):
        ProtectionPolicy(rpo_seconds=60, transfer="sideways")  # type: ignore[arg-type]
    # pull needs frozen exports that live from freeze to release: a source that declares
    # serve_remote (KVM does, VMware does not)
    from connectors.registry import source_for

    check_pull_source("pull", source_for(
        PlatformInfo(name="k", kind=PlatformKind.KVM, site="a", config={}), {}))
    vmw = source_for(PlatformInfo(name="vc", kind=PlatformKind.VMWARE, site="a", config={}), {})
    check_pull_source("push", vmw)
    with pytest.raises(PermanentError, match=r"'pull'.*'vc' \(vmware\) does not serve.*'push'"):
        check_pull_source("pull", vmw)


def test_change_sets_survive_the_catalog() -> None:
    """A pull transfer's change set goes from the source site's freeze to the target
    site's stream as bytes: every extent and the summary come back equal."""
    rng = random.Random(7)
    extents = [ChangeExtent(rng.randrange(1 << 40) * BS, rng.randrange(1, 1 << 20) * BS,
                            rng.random() < 0.3) for _ in range(5000)]
    summary = ChangeSummary(disk="vda", kind=ChangeKind.INCREMENTAL, extents=len(extents),
                            data_bytes=123, disk_size=1 << 50, reason="bitmap")
    packed = pullexport.pack_changes(ChangeSet(summary=summary, extents=extents))
    back = pullexport.unpack_changes(packed)
    assert back.summary == summary and back.extents == extents
    with pytest.raises(ValueError):
        pullexport.unpack_changes(packed[:-9] + b"x")


def test_settings_and_credential_errors(tmp_path: Path, pki_base: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSCEND_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSCEND_SITE", "a")
    monkeypatch.setenv("TRANSCEND_SITE_ADDRESS", "dr-a.example")
    monkeypatch.setenv("TRANSCEND_NBD_PORT_MIN", "11000")
    monkeypatch.setenv("TRANSCEND_NBD_PORT_MAX", "11010")
    monkeypatch.setenv("TRANSCEND_CONFIG", str(tmp_path / "none.toml"))
    s = load_settings()
    assert (s.site_address, s.nbd_port_min, s.nbd_port_max) == ("dr-a.example", 11000, 11010)
    assert s.site_tls_dir == tmp_path / "pki" / "sites" / "a"
    monkeypatch.setenv("TRANSCEND_NBD_PORT_MIN", "12000")
    with pytest.raises(ValueError, match="nbd_port_min 12000 is above nbd_port_max 11010"):
        load_settings()

    # no site directory: what to run and where to copy it
    with pytest.raises(nbdtls.TlsSetupError) as ei:
        nbdtls.with_local_credentials("nbds://192.0.2.1:10810/vda", s)
    msg = str(ei.value)
    assert "transcend ca issue a --host dr-a.example" in msg and str(s.site_tls_dir) in msg
    # a client key missing
    d = tmp_path / "partial"
    shutil.copytree(pki_base / "sites" / "a", d)
    (d / pki.CLIENT_KEY).unlink()
    with pytest.raises(nbdtls.TlsSetupError, match=r"client-key\.pem missing"):
        nbdtls.with_local_credentials("nbds://192.0.2.1:10810/vda", _settings("a", tmp_path, d))
    # push needs an address
    with pytest.raises(nbdtls.TlsSetupError, match="TRANSCEND_SITE_ADDRESS"):
        nbdtls.remote_export(_settings("b", tmp_path, pki_base / "sites" / "b", address=""))
    # unix URIs pass through; a TLS URI gets this site's directory (replacing another's)
    ok = _settings("a", tmp_path, pki_base / "sites" / "a")
    unix = "nbd+unix:///vda?socket=/run/x.sock"
    assert nbdtls.with_local_credentials(unix, ok) == unix
    uri = nbdtls.with_local_credentials("nbds://[::1]:10810/vda?tls-certificates=/elsewhere", ok)
    assert uri == f"nbds://[::1]:10810/vda?tls-certificates={pki_base / 'sites' / 'a'}"


@needs_qemu
@pytest.mark.timeout(120)
def test_staging_push_export_over_tls(tmp_path: Path, pki_base: Path) -> None:
    port = free_port()
    ports = (port, port + 3)
    tb = _settings("b", tmp_path / "home-b", pki_base / "sites" / "b", ports=ports)
    ta = _settings("a", tmp_path / "home-a", pki_base / "sites" / "a")
    info = PlatformInfo(name="kvm-b", kind=PlatformKind.KVM, site="b",
                        config={"root": str(tmp_path / "replicas")})
    size = 4 * MiB
    disks = [DiskInfo(id="vda", size=size)]
    staging = KvmTarget(info, {}).begin_remote("p1", "c1", disks, None, nbdtls.remote_export(tb))
    try:
        ep = staging.handle.remote["vda"]
        assert ep.uri.startswith("nbds://127.0.0.1:") and "tls-certificates" not in ep.uri
        used = int(ep.uri.split(":")[2].split("/")[0])
        assert ports[0] <= used <= ports[1]

        # site a writes with its own client certificate
        data = random.Random(1).randbytes(size // 2)
        src = tmp_path / "src.raw"
        src.write_bytes(data + bytes(size - len(data)))
        src_uri = _serve_raw(tmp_path, src)
        dst = nbdtls.with_local_credentials(ep.uri, ta)
        manifest = bytearray(blockstream.zero_manifest(size, BS))
        blockstream.Stream(src_uri, dst, [blockstream.Extent(0, size)], disk_size=size,
                           manifest=manifest, block_size=BS).run()

        # a stranger's certificate is refused, and the error says so
        bad = _settings("a", tmp_path / "home-a", _stranger(tmp_path, pki_base, "a"))
        bad_uri = nbdtls.with_local_credentials(ep.uri, bad)
        with pytest.raises(blockstream.BlockstreamError) as ei:
            blockstream.Stream(src_uri, bad_uri, [blockstream.Extent(0, BS)], disk_size=size,
                               manifest=bytearray(len(manifest)), block_size=BS).run()
        assert ei.value.endpoint == "destination"
        refused = nbdtls.tls_refusal(bad_uri, ei.value.nbd_error, bad)
        assert refused is not None, ei.value.nbd_error
        assert "127.0.0.1" in str(refused) and str(bad.site_tls_dir) in str(refused)

        # another process (a fresh target object) finds the running export again; a
        # killed qemu-nbd is restarted on the same port, so the handle's URI stays valid
        again = KvmTarget(info, {}).resume(staging.handle)
        assert again.endpoint("vda").uri == ep.uri
        nbd = again._nbd("vda")
        pid = nbd.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while nbd.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        KvmTarget(info, {}).resume(staging.handle)
        assert nbd.pid() not in (None, pid)
        # a retried begin keeps the running export and its port
        retried = KvmTarget(info, {}).begin_remote("p1", "c1", disks, None,
                                                   nbdtls.remote_export(tb))
        assert retried.handle.remote["vda"].uri == ep.uri
        # the target site reads it back through the same URI with its own certificate
        assert export_sha256(nbdtls.with_local_credentials(ep.uri, tb)) == \
            export_sha256(src_uri)

        layers = again.commit(PointMeta(cycle_id="c1", instant=datetime.now(UTC),
                                        block_size=BS, kind=ChangeKind.FULL))
        assert nbd.pid() is None
        proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src),
                               layers[0]], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        with contextlib.suppress(Exception):
            KvmTarget(info, {}).resume(staging.handle).abort()
        _stop_servers()


def _psk_settings(site: str, home: Path, psk_dir: Path, ports: tuple[int, int]) -> Settings:
    return Settings(home=home, site=site, site_address="127.0.0.1", nbd_port_min=ports[0],
                    nbd_port_max=ports[1], nbd_tls_dir=str(psk_dir), nbd_tls="psk")


def _hashes(uri: str, size: int) -> bytes:
    """Block hashes of an export read through blockstream (which takes tls-username
    from the URI, unlike libnbd 1.14's own tools)."""
    manifest = bytearray(blockstream.zero_manifest(size, BS))
    blockstream.copy(uri, None, [blockstream.Extent(0, size)], disk_size=size,
                     manifest=manifest, block_size=BS)
    return bytes(manifest)


@needs_qemu
@pytest.mark.timeout(120)
def test_psk_push_export_and_pull_front(tmp_path: Path) -> None:
    """PSK instead of certificates, both ways data crosses: a staging export (push)
    written by site a, and a front of a frozen disk (pull) read by site b; a key of
    another PSK file is refused, naming PSK."""
    shared = tmp_path / "psk"
    pki.psk_new(shared / pki.PSK_FILE, "transcend")
    other = tmp_path / "psk-other"
    pki.psk_new(other / pki.PSK_FILE, "transcend")  # same identity, another key
    port = free_port()
    ports = (port, port + 3)
    sb = _psk_settings("b", tmp_path / "home-b", shared, ports)
    sa = _psk_settings("a", tmp_path / "home-a", shared, ports)
    stranger = _psk_settings("a", tmp_path / "home-a", other, ports)
    info = PlatformInfo(name="kvm-b", kind=PlatformKind.KVM, site="b",
                        config={"root": str(tmp_path / "replicas")})
    size = 4 * MiB
    disks = [DiskInfo(id="vda", size=size)]
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(2).randbytes(size // 2) + bytes(size // 2))
    src_uri = _serve_raw(tmp_path, src)
    want = _hashes(src_uri, size)
    staging = KvmTarget(info, {}).begin_remote("p1", "c1", disks, None, nbdtls.remote_export(sb))
    frozen_handle = FrozenHandle(platform="kvm-a", protection="p1", cycle_id="c1",
                                 instant=datetime.now(UTC), disks=disks,
                                 kinds={"vda": ChangeKind.FULL})
    try:
        # push: site a writes into site b's PSK export with the shared key
        ep = staging.handle.remote["vda"]
        dst = nbdtls.with_local_credentials(ep.uri, sa)
        assert "tls-username=transcend" in dst and "tls-certificates" not in dst
        manifest = bytearray(blockstream.zero_manifest(size, BS))
        blockstream.Stream(src_uri, dst, [blockstream.Extent(0, size)], disk_size=size,
                           manifest=manifest, block_size=BS).run()
        assert bytes(manifest) == want
        bad = nbdtls.with_local_credentials(ep.uri, stranger)
        with pytest.raises(blockstream.BlockstreamError) as ei:
            blockstream.Stream(src_uri, bad, [blockstream.Extent(0, BS)], disk_size=size,
                               manifest=bytearray(len(manifest)), block_size=BS).run()
        refused = nbdtls.tls_refusal(bad, ei.value.nbd_error, stranger)
        assert refused is not None and "PSK" in str(refused), ei.value.nbd_error
        # a retried begin recognises its PSK export and keeps the port
        retried = KvmTarget(info, {}).begin_remote("p1", "c1", disks, None,
                                                   nbdtls.remote_export(sb))
        assert retried.handle.remote["vda"].uri == ep.uri

        # pull: site a fronts a frozen disk (here: the raw source) with the PSK, and
        # site b reads it with its own copy of the key; the stranger is refused
        class Frozen:
            handle = frozen_handle

            def export(self, disk: str) -> NbdEndpoint:
                return NbdEndpoint(uri=src_uri, size=size)

        remote = pullexport.serve_frozen(sa, Frozen())  # type: ignore[arg-type]
        frozen_handle.remote = remote
        assert _hashes(nbdtls.with_local_credentials(remote["vda"].uri, sb), size) == want
        with pytest.raises(blockstream.BlockstreamError):
            _hashes(nbdtls.with_local_credentials(remote["vda"].uri, stranger), size)
        assert pullexport.serve_frozen(sa, Frozen()) == remote  # idempotent  # type: ignore[arg-type]
        # the next cycle of the protection stops the fronts an earlier one left behind
        # (a cycle that failed before its release)
        pids = sorted((sa.home / "pull").glob("*.pid"))
        old = [int(f.read_text()) for f in pids]
        assert len(old) == 1 and _running(old[0])

        class NextCycle(Frozen):
            handle = frozen_handle.model_copy(update={"cycle_id": "c2", "remote": {}})

        later = pullexport.serve_frozen(sa, NextCycle())  # type: ignore[arg-type]
        assert not _running(old[0])
        assert _hashes(nbdtls.with_local_credentials(later["vda"].uri, sb), size) == want
        pullexport.stop_frozen(sa, NextCycle.handle.model_copy(update={"remote": later}))
        assert not list((sa.home / "pull").glob("*.pid"))
    finally:
        with contextlib.suppress(Exception):
            pullexport.stop_frozen(sa, frozen_handle)
        with contextlib.suppress(Exception):
            KvmTarget(info, {}).resume(staging.handle).abort()
        _stop_servers()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


_SERVERS: list[subprocess.Popen[bytes]] = []


def _serve_raw(tmp: Path, image: Path) -> str:
    sock = tmp / "src.sock"
    p = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-t", "-e", "4", "-k", str(sock),
                          str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _SERVERS.append(p)
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return f"nbd+unix:///?socket={sock}"


def _stop_servers() -> None:
    while _SERVERS:
        p = _SERVERS.pop()
        p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


# Run in site b's namespace: KvmTarget.begin_remote / commit / abort with site b's
# settings, the handle as JSON on stdout (what target.begin returns to the workflow).
_TARGET_SCRIPT = r"""
import json, sys
from datetime import UTC, datetime
from connectors.kvm.target import KvmTarget
from transcend import nbdtls
from transcend.config import Settings
from transcend.models import ChangeKind, DiskInfo, PlatformInfo, PointMeta, StagingHandle
action, root, settings_json, arg = sys.argv[1:5]
settings = Settings.model_validate_json(settings_json)
target = KvmTarget(PlatformInfo(name="kvm-b", kind="kvm", site="b", config={"root": root}), {})
if action == "begin":
    st = target.begin_remote("p1", "c1", [DiskInfo(id="vda", size=int(arg))], None,
                             nbdtls.remote_export(settings))
    print(st.handle.model_dump_json())
elif action == "commit":
    st = target.resume(StagingHandle.model_validate_json(arg))
    print(json.dumps(st.commit(PointMeta(cycle_id="c1", instant=datetime.now(UTC),
                                         block_size=65536, kind=ChangeKind.FULL))))
else:
    target.resume(StagingHandle.model_validate_json(arg)).abort()
"""


@needs_qemu
@pytest.mark.timeout(120)
def test_push_export_across_namespaces(tmp_path: Path) -> None:
    """The data path of a push cycle between two network namespaces, without guests or
    workers: site b exports a staging layer on its link address with TLS, site a
    writes into it with its own certificate; the bytes cross the site link."""
    from tests.harness.nbd import qemu_nbd

    with contextlib.ExitStack() as stack:
        try:
            net = stack.enter_context(two_sites("xp"))
        except NamespacesUnavailable as e:
            pytest.skip(f"network namespaces unavailable: {e}")
        base = tmp_path / "pki"
        pki.init_ca(base, "xp CA", days=2)
        for site in ("a", "b"):
            pki.issue_site(base, site, ips=[net.address(site)], days=1)  # type: ignore[arg-type]
        sb = _settings("b", tmp_path / "home-b", base / "sites" / "b", address=net.address("b"))
        sa = _settings("a", tmp_path / "home-a", base / "sites" / "a", address=net.address("a"))
        size = 16 * MiB
        root = str(tmp_path / "replicas")

        def target(action: str, arg: str) -> str:
            cp = net.run("b", [sys.executable, "-c", _TARGET_SCRIPT, action, root,
                               sb.model_dump_json(), arg], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
            assert cp.returncode == 0, cp.stderr
            return cp.stdout

        handle = target("begin", str(size))
        stack.callback(lambda: net.run("b", [sys.executable, "-c", _TARGET_SCRIPT, "abort", root,
                                             sb.model_dump_json(), handle], cwd=REPO,
                                       capture_output=True, timeout=60))
        uri = json.loads(handle)["remote"]["vda"]["uri"]
        assert uri.startswith(f"nbds://{net.address('b')}:")

        src = tmp_path / "src.raw"
        src.write_bytes(random.Random(2).randbytes(size))
        copier = r"""
import sys, blockstream
src, dst, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = bytearray(blockstream.zero_manifest(size, 65536))
try:
    blockstream.Stream(src, dst, [blockstream.Extent(0, size)], disk_size=size, manifest=m,
                       block_size=65536).run()
    print("ok")
except blockstream.BlockstreamError as e:
    print(e.endpoint, e.nbd_error)
"""
        with qemu_nbd(src, fmt="raw", read_only=True) as s:
            rx0 = _link_rx(net, "b")
            # a stranger is refused by site b's server
            bad = _settings("a", tmp_path / "home-a", _stranger(tmp_path, base, "a"))
            cp = net.run("a", [sys.executable, "-c", copier, s.uri,
                               nbdtls.with_local_credentials(uri, bad), str(size)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
            out = cp.stdout.strip()
            assert out.startswith("destination"), cp.stdout + cp.stderr
            assert nbdtls.tls_refusal(uri, out, bad) is not None, out
            # site a's own bundle: the copy crosses the link
            cp = net.run("a", [sys.executable, "-c", copier, s.uri,
                               nbdtls.with_local_credentials(uri, sa), str(size)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
            assert cp.stdout.strip() == "ok", cp.stdout + cp.stderr
            assert _link_rx(net, "b") - rx0 >= size
        layers = json.loads(target("commit", handle))
        proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src),
                               layers[0]], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _link_rx(net: TwoSites, site: Site) -> int:
    out = subprocess.run(["ip", "-n", net.ns[site], "-j", "-s", "link", "show", "dev",
                          net.site_dev[site]], capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


# =========================================================================== two sites


@dataclass
class CrossSite:
    """Two sites in namespaces, their workers, the dev server and the shared catalog."""

    net: TwoSites
    root: Path
    server: DevServer
    pki_base: Path
    common: dict[str, str]
    homes: dict[str, Path] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def env(self, site: Site) -> dict[str, str]:
        return {**os.environ, **self.common, "TRANSCEND_HOME": str(self.homes[site]),
                "TRANSCEND_SITE": site, "TRANSCEND_SITE_ADDRESS": self.net.address(site)}

    @property
    def settings(self) -> Settings:
        return Settings(home=self.homes["a"], catalog_url=self.common["TRANSCEND_CATALOG_URL"],
                        temporal_address=self.server.address,
                        secret_key_file=self.common["TRANSCEND_SECRET_KEY_FILE"],
                        codec_key_file=self.common["TRANSCEND_CODEC_KEY_FILE"])

    def catalog(self) -> Catalog:
        return Catalog.from_settings(self.settings)

    async def client(self) -> Client:
        return await connect(self.settings)

    def site_bundle(self, site: Site) -> Path:
        """Where the worker of ``site`` looks for its certificates (the default)."""
        return self.homes[site] / "pki" / "sites" / site

    def install_bundle(self, site: Site, source: Path) -> None:
        """Copy a bundle to the site, as an operator does after `transcend ca issue`."""
        d = self.site_bundle(site)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(source, d)

    def start_worker(self, site: Site, *, control: bool) -> None:
        log = self.root / f"worker-{site}.log"
        argv = [sys.executable, str(REPO / "worker.py"), "--site", site]
        if not control:
            argv.append("--no-control")
        p = self.net.popen(site, argv, cwd=REPO, env=self.env(site), stdout=log.open("ab"),
                           stderr=subprocess.STDOUT)
        self.workers[site], self.logs[site] = p, log
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if "transcend worker ready" in log.read_text(errors="replace"):
                return
            if p.poll() is not None:
                raise RuntimeError(f"worker {site} exited: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker {site} not ready: {log.read_text(errors='replace')[-3000:]}")

    def stop_workers(self) -> None:
        for p in self.workers.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.workers.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def log_tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- worker {s}\n{p.read_text(errors='replace')[-n:]}"
                         for s, p in self.logs.items() if p.exists())

    def link_bytes(self, site: Site) -> tuple[int, int]:
        """(rx, tx) bytes of ``site``'s end of the site link."""
        out = subprocess.run(["ip", "-n", self.net.ns[site], "-j", "-s", "link", "show", "dev",
                              self.net.site_dev[site]], capture_output=True, text=True,
                             check=True).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def add_platforms(self, cat: Catalog) -> tuple[str, str]:
        cat.add_platform(PlatformSpec(name="kvm-a", kind=PlatformKind.KVM, site="a",
                                      config={"uri": "qemu:///system"}), replace=True)
        cat.add_platform(PlatformSpec(name="kvm-b", kind=PlatformKind.KVM, site="b",
                                      config={"root": str(self.root / "replicas-b"),
                                              "domain_type": "qemu"}), replace=True)
        return "kvm-a", "kvm-b"

    def staging_left(self) -> list[Path]:
        return sorted((self.root / "replicas-b").rglob("staging-*"))


@pytest.fixture(scope="module")
def xsite(tmp_path_factory: pytest.TempPathFactory, guest_image: GuestImage) -> Iterator[CrossSite]:
    root = tmp_path_factory.mktemp("xsite")
    with contextlib.ExitStack() as stack:
        try:
            # the site link is the harness's delay line, so a WAN's delay can be
            # added on any kernel (this one may lack sch_netem)
            net = stack.enter_context(two_sites("xs", link="tun"))
        except NamespacesUnavailable as e:
            pytest.skip(f"network namespaces unavailable: {e}")
        # the qemu user must reach the source's backup socket under home-a
        stack.enter_context(traversable(root))
        # The dev server on loopback (its services dial each other there), exposed to
        # both namespaces on the host address by the harness's relay.
        server = start_dev_server(root / "temporal.db", port=free_port(), ui_port=free_port())
        stack.callback(server.stop)
        relay_host, relay_port = net.forward(server.port)
        shared = root / "shared"
        shared.mkdir()
        common = {
            "TRANSCEND_TEMPORAL_ADDRESS": f"{relay_host}:{relay_port}",
            # one catalog for every worker: an SQLite file reaches across namespaces
            "TRANSCEND_CATALOG_URL": f"sqlite:///{shared / 'catalog.sqlite'}",
            "TRANSCEND_SECRET_KEY_FILE": str(shared / "catalog.key"),
            "TRANSCEND_CODEC_KEY_FILE": str(shared / "payload.keys"),
            "TRANSCEND_CONFIG": str(shared / "none.toml"),
            # a black-holed link fails a stream after this long without progress
            "TRANSCEND_STREAM_STALL_SECONDS": str(STALL_SECONDS),
        }
        pki_base = root / "pki-ca"
        pki.init_ca(pki_base, "transcend cross-site CA", days=2)
        xs = CrossSite(net=net, root=root, server=server, pki_base=pki_base, common=common)
        for site in ("a", "b"):
            # the server certificate names the address the other site dials
            pki.issue_site(pki_base, site, ips=[net.address(site)], days=1)
            xs.homes[site] = root / f"home-{site}"
            xs.install_bundle(site, pki_base / "sites" / site)
        SecretBox.from_key_file(shared / "catalog.key")
        codec_keys(xs.settings)  # created once, before two workers race for it
        stack.callback(xs.stop_workers)
        xs.start_worker("a", control=True)
        xs.start_worker("b", control=False)
        try:
            yield xs
        except BaseException:
            print(xs.log_tail())
            raise


def _spec(name: str, vm: str, src: str, dst: str, **policy: object) -> ProtectionSpec:
    spec = protection_spec(name, vm, src, dst)
    spec.policy = spec.policy.model_copy(update=policy)
    return spec


async def _paused_point_equals_source(xs: CrossSite, handle: WorkflowHandle[Any, Any],
                                      dom: libvirt.virDomain, disk: Path) -> RecoveryPoint:
    """With the guest paused, one more cycle: an incremental point equal to the source
    disk byte for byte."""
    dom.suspend()
    try:
        st = await sync_now(handle, timeout=120)
        assert st.cycles_failed == 0, f"{st.last_error}\n{xs.log_tail()}"
        point = xs.catalog().get_point(st.last_point_id or "")
        assert point.kind.value == "incremental"
        same, detail = images_identical(disk, point_path(point))
        assert same, detail
        return point
    finally:
        dom.resume()


@contextlib.contextmanager
def _link(xs: CrossSite, kind: str) -> Iterator[None]:
    """``lan``: the link as it is.  ``wan``: RTT +50 ms (25 ms each way),
    200 Mbit/s each way, 0.1 % loss in the direction the data flows (a -> b)."""
    if kind == "wan":
        xs.net.netem("a", delay_ms=25, loss_pct=0.1, rate_mbit=200)
        xs.net.netem("b", delay_ms=25, rate_mbit=200)
    try:
        yield
        if kind == "wan":  # the delay was still in force at the end: nothing cleared it
            assert xs.net.delayline is not None
            st = xs.net.delayline.stats()
            assert st["a"]["delay_ms"] == 25 and st["b"]["delay_ms"] == 25, st
    finally:
        xs.net.clear()


@pytest.mark.guest
@pytest.mark.timeout(400)
@pytest.mark.parametrize("link", ["lan", "wan"])
def test_push_cycle_across_sites_verifies(xsite: CrossSite, guest_image: GuestImage,
                                          tmp_path: Path, link: str) -> None:
    with _link(xsite, link):
        asyncio.run(_push_cycle(xsite, guest_image, tmp_path, f"xs-push-{link}"))


async def _push_cycle(xs: CrossSite, image: GuestImage, tmp_path: Path, name: str) -> None:
    cat = xs.catalog()
    src, dst = xs.add_platforms(cat)
    client = await xs.client()
    vm = f"transcend-xs-a-{os.getpid()}"
    with traversable(tmp_path), booted_guest(image, tmp_path, vm) as (dom, disk):
        rx0, _ = xs.link_bytes("b")
        handle = await start_protection(client, _spec(name, vm, src, dst))  # auto: push
        st = await wait_first_point(handle, timeout=180)
        assert st.cycles_failed == 0, f"{st.last_error}\n{xs.log_tail()}"
        rx1, _ = xs.link_bytes("b")
        first = cat.get_point(st.last_point_id or "")
        assert first.kind.value == "full" and first.bytes_written > MiB
        # the copy crossed the site link (site b received at least what was written)
        assert rx1 - rx0 >= first.bytes_written, (rx1 - rx0, first.bytes_written)
        # the point lives at site b, and its staging layer is gone
        assert point_path(first).is_relative_to(xs.root / "replicas-b")
        assert not xs.staging_left()
        result = await verify_point(client, first.id)
        assert result.ok and not result.mismatched_blocks, result
        check_contiguous(read_records(point_path(first)))  # a consistent prefix of the records

        # Paused guest: the next (incremental) point equals the source byte for byte.
        await _paused_point_equals_source(xs, handle, dom, disk)
        await handle.execute_update("remove", result_type=ReplicationStatus)


@pytest.mark.guest
@pytest.mark.timeout(500)
@pytest.mark.parametrize("link", ["lan", "wan"])
def test_pull_cycle_across_sites_verifies(xsite: CrossSite, guest_image: GuestImage,
                                          tmp_path: Path, link: str) -> None:
    with _link(xsite, link):
        asyncio.run(_pull_cycle(xsite, guest_image, tmp_path, f"xs-pull-{link}"))


def _pull_fronts(xs: CrossSite) -> list[Path]:
    """Pid files of site a's TLS fronts of frozen disks (transcend/pullexport.py)."""
    return sorted((xs.homes["a"] / "pull").glob("*.pid"))


async def _pull_cycle(xs: CrossSite, image: GuestImage, tmp_path: Path, name: str) -> None:
    cat = xs.catalog()
    src, dst = xs.add_platforms(cat)
    client = await xs.client()
    vm = f"transcend-xs-p-{os.getpid()}"
    with traversable(tmp_path), booted_guest(image, tmp_path, vm) as (dom, disk):
        _, tx0 = xs.link_bytes("a")
        handle = await start_protection(client, _spec(name, vm, src, dst, transfer="pull"))
        st = await wait_first_point(handle, timeout=180)
        assert st.cycles_failed == 0, f"{st.last_error}\n{xs.log_tail()}"
        _, tx1 = xs.link_bytes("a")
        first = cat.get_point(st.last_point_id or "")
        assert first.kind.value == "full" and first.bytes_written > MiB
        # site a *sent* the data over the link (site b read it from a's front)
        assert tx1 - tx0 >= first.bytes_written, (tx1 - tx0, first.bytes_written)
        assert point_path(first).is_relative_to(xs.root / "replicas-b")
        assert not xs.staging_left() and not _pull_fronts(xs)
        result = await verify_point(client, first.id)
        assert result.ok and not result.mismatched_blocks, result

        # Incremental through the front (the change set came through the catalog):
        # with the guest paused, the point equals the source byte for byte.
        second = await _paused_point_equals_source(xs, handle, dom, disk)

        # Site b presents a client certificate of another CA: site a's front refuses
        # it, the cycle fails at once naming TLS and site b's bundle, and nothing of it
        # is left (front, staging layer, point).
        xs.install_bundle("b", _stranger(tmp_path, xs.pki_base, "b"))
        try:
            st = await sync_now(handle, timeout=150)
            assert st.last_point_id == second.id, st
            assert "TLS" in st.last_error and "certificate" in st.last_error, st.last_error
            assert str(xs.site_bundle("b")) in st.last_error, st.last_error
        finally:
            xs.install_bundle("b", xs.pki_base / "sites" / "b")
        assert not xs.staging_left() and not _pull_fronts(xs)
        await handle.execute_update("remove", result_type=ReplicationStatus)


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_untrusted_certificate_fails_the_cycle(xsite: CrossSite, guest_image: GuestImage,
                                               tmp_path: Path) -> None:
    asyncio.run(_untrusted(xsite, guest_image, tmp_path))


async def _untrusted(xs: CrossSite, image: GuestImage, tmp_path: Path) -> None:
    cat = xs.catalog()
    src, dst = xs.add_platforms(cat)
    client = await xs.client()
    vm = f"transcend-xs-b-{os.getpid()}"
    # site a now holds a client certificate of another CA (it still trusts site b's)
    xs.install_bundle("a", _stranger(tmp_path, xs.pki_base, "a"))
    try:
        with traversable(tmp_path), booted_guest(image, tmp_path, vm):
            handle = await start_protection(client, _spec("xs-untrusted", vm, src, dst,
                                                          transfer="push"))
            st = await wait_first_point(handle, timeout=180)
            assert st.cycles_failed == 1 and st.last_point_id is None, st
            assert "TLS" in st.last_error and "certificate" in st.last_error, st.last_error
            assert str(xs.site_bundle("a")) in st.last_error, st.last_error
            assert cat.points("xs-untrusted") == []
            assert not xs.staging_left()  # the staging layer was thrown away

            # with site a's own bundle back, the next cycle commits
            xs.install_bundle("a", xs.pki_base / "sites" / "a")
            st = await sync_now(handle, timeout=150)
            assert st.last_point_id is not None, f"{st.last_error}\n{xs.log_tail()}"
            result = await verify_point(client, st.last_point_id)
            assert result.ok, result
            await handle.execute_update("remove", result_type=ReplicationStatus)
    finally:
        xs.install_bundle("a", xs.pki_base / "sites" / "a")


# The link-cut test's shape: the policy throttles the copy to 2 MiB/s over two
# connections, so with activities/cycle.py's flush rules (a flush round every
# FLUSH_SECONDS = 2 s or flush_interval = 2 s of the limit, at least 1 MiB) the
# bytes a failed attempt moved beyond its durable offset -- one in-flight window --
# are at most one flush interval plus one request (blockstream's max_request,
# 4 MiB) per connection.
CUT_RATE = 2 * MiB
CUT_CONNECTIONS = 2
STALL_SECONDS = 8  # TRANSCEND_STREAM_STALL_SECONDS of the two sites' workers
CUT_SECONDS = 20  # longer than the stall limit: the stream must fail and resume


def _window() -> int:
    from activities.cycle import STREAM_REQUEST, flush_interval

    return flush_interval(CUT_RATE) + CUT_CONNECTIONS * STREAM_REQUEST


@dataclass
class StreamAttempt:
    """The attempt of a stream.disk activity that completed, from the history."""

    attempt: int
    last_failure: str  # of the attempt before it
    result: StreamResult


async def _stream_attempts(client: Client, protection: str) -> list[StreamAttempt]:
    out: list[StreamAttempt] = []
    async for wf in client.list_workflows(f'WorkflowType="{CYCLE_WORKFLOW}" AND '
                                          f'TranscendProtection="{protection}"'):
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        streams: set[int] = set()
        started: dict[int, tuple[int, str]] = {}
        for ev in history.events:
            if ev.HasField("activity_task_scheduled_event_attributes"):
                if ev.activity_task_scheduled_event_attributes.activity_type.name == "stream.disk":
                    streams.add(ev.event_id)
            elif ev.HasField("activity_task_started_event_attributes"):
                a = ev.activity_task_started_event_attributes
                started[a.scheduled_event_id] = (a.attempt, a.last_failure.message)
            elif ev.HasField("activity_task_completed_event_attributes"):
                c = ev.activity_task_completed_event_attributes
                if c.scheduled_event_id in streams:
                    (result,) = await client.data_converter.decode(c.result.payloads,
                                                                   [StreamResult])
                    attempt, message = started[c.scheduled_event_id]
                    out.append(StreamAttempt(attempt, message, result))
    return out


def _data_bytes(image: Path) -> int:
    """Bytes of the image's 64 KiB blocks that are not all zeros (what a full copy
    sends as data), read through qemu-img."""
    raw = image.with_suffix(".raw-copy")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
    try:
        total = 0
        with raw.open("rb") as f:
            while block := f.read(BS):
                total += len(block) if block.count(0) != len(block) else 0
        return total
    finally:
        raw.unlink()


@pytest.mark.guest
@pytest.mark.timeout(400)
def test_link_cut_fails_the_stream_and_resumes(xsite: CrossSite, guest_image: GuestImage,
                                               tmp_path: Path) -> None:
    asyncio.run(_link_cut(xsite, guest_image, tmp_path))


def _random_data_disk(tmp_path: Path, mib: int) -> Path:
    """A 64 MiB qcow2 with ``mib`` MiB of random data at 8 MiB."""
    data_disk = tmp_path / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data_disk), "64M"], check=True)
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(os.urandom(mib * MiB))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {rnd} 8M {mib}M", str(data_disk)],
                   check=True, capture_output=True)
    rnd.unlink()
    return data_disk


async def _link_cut(xs: CrossSite, image: GuestImage, tmp_path: Path) -> None:
    cat = xs.catalog()
    src, dst = xs.add_platforms(cat)
    client = await xs.client()
    vm = f"transcend-xs-c-{os.getpid()}"
    # 48 MiB of random data on a second disk: at 2 MiB/s the copy takes ~25 s
    data_disk = _random_data_disk(tmp_path, 48)
    with traversable(tmp_path), booted_guest(image, tmp_path, vm,
                                             extra_disks=[DiskSpec(path=data_disk, target="vdb")]
                                             ) as (_, disk):
        rx0, _ = xs.link_bytes("b")
        handle = await start_protection(client, _spec(
            "xs-cut", vm, src, dst, bandwidth_bytes_per_s=CUT_RATE, connections=CUT_CONNECTIONS))
        # well into the copy (so restarting from offset 0 would resend far more than a
        # window), the link turns into a black hole: connections stall, no error
        deadline = time.monotonic() + 120
        while xs.link_bytes("b")[0] - rx0 < 30 * MiB:
            assert time.monotonic() < deadline, "the copy did not start"
            await asyncio.sleep(0.2)
        xs.net.link_down("blackhole")
        try:
            await asyncio.sleep(CUT_SECONDS)
        finally:
            xs.net.link_up()
        st = await wait_for(lambda: status(handle), lambda s: s.cycles_ok + s.cycles_failed > 0,
                            240, "the first point after the cut")
        rx1, _ = xs.link_bytes("b")
        assert st.cycles_failed == 0 and st.last_point_id, f"{st.last_error}\n{xs.log_tail()}"
        point = cat.get_point(st.last_point_id)
        assert sorted(d.disk for d in point.disks) == ["vda", "vdb"]
        same, detail = images_identical(data_disk, point_path(point, "vdb"))
        assert same, detail
        result = await verify_point(client, point.id)
        assert result.ok and not result.mismatched_blocks, result

        (rec,) = [c for c in cat.cycles("xs-cut") if c.point_id == point.id]
        window = _window()
        print(f"cut cycle: resent {rec.bytes_resent} B (window {window} B), link {rx1 - rx0} B")
        # The attempt in flight failed (the sender's TCP reports the black-holed link
        # within seconds; had it not, the stall limit would have cancelled it), was
        # retried (a connect into the black hole may fail once more) and the attempt
        # that completed resumed from the durable offset (Temporal's history: its
        # attempt number and result)...
        attempts = await _stream_attempts(client, "xs-cut")
        (big,) = [a for a in attempts if a.result.disk == "vdb"]
        assert big.attempt >= 2 and big.result.resumed_from > 0, big
        # ... and what it moved again, counted by the engine, is at most one window.
        assert rec.bytes_resent <= window, (rec.bytes_resent, window)
        assert rec.bytes_resent == sum(a.result.bytes_resent for a in attempts)
        # The link agrees: site b received the disks' data once, plus at most one
        # window, plus TCP/IP and TLS framing (under 6 % at a 1500-byte MTU) and a
        # little for the guest's writes during the copy. Starting over from offset 0
        # would have added the 30+ MiB that had crossed before the cut.
        data = _data_bytes(data_disk) + _data_bytes(disk)
        bound = int((data + window) * 1.06) + 2 * MiB
        assert rx1 - rx0 <= bound, (rx1 - rx0, data, window, bound)
        await handle.execute_update("remove", result_type=ReplicationStatus)


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_stalled_server_fails_the_stream_fast(xsite: CrossSite, guest_image: GuestImage,
                                              tmp_path: Path) -> None:
    asyncio.run(_stalled_server(xsite, guest_image, tmp_path))


def _staging_servers(xs: CrossSite) -> list[int]:
    """Pids of site b's push exports (qemu-nbd bound to its link address)."""
    out = subprocess.run(["pgrep", "-f", f"qemu-nbd .*--bind {xs.net.address('b')} "],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def _stalled_server(xs: CrossSite, image: GuestImage, tmp_path: Path) -> None:
    """A server that stops answering (SIGSTOP) while its connections stay open: nothing
    fails by itself, only the stall limit ends the attempt; the retry resumes."""
    cat = xs.catalog()
    src, dst = xs.add_platforms(cat)
    client = await xs.client()
    vm = f"transcend-xs-s-{os.getpid()}"
    data_disk = _random_data_disk(tmp_path, 24)
    with traversable(tmp_path), booted_guest(image, tmp_path, vm,
                                             extra_disks=[DiskSpec(path=data_disk, target="vdb")]):
        rx0, _ = xs.link_bytes("b")
        handle = await start_protection(client, _spec(
            "xs-stall", vm, src, dst, bandwidth_bytes_per_s=CUT_RATE, connections=CUT_CONNECTIONS))
        deadline = time.monotonic() + 120
        while xs.link_bytes("b")[0] - rx0 < 8 * MiB:
            assert time.monotonic() < deadline, "the copy did not start"
            await asyncio.sleep(0.2)
        stopped = _staging_servers(xs)
        assert stopped, "no push export of site b found"
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(STALL_SECONDS + 10)
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        st = await wait_for(lambda: status(handle), lambda s: s.cycles_ok + s.cycles_failed > 0,
                            180, "the first point after the stall")
        assert st.cycles_failed == 0 and st.last_point_id, f"{st.last_error}\n{xs.log_tail()}"
        point = cat.get_point(st.last_point_id)
        same, detail = images_identical(data_disk, point_path(point, "vdb"))
        assert same, detail
        attempts = await _stream_attempts(client, "xs-stall")
        (big,) = [a for a in attempts if a.result.disk == "vdb"]
        assert big.attempt >= 2 and big.result.resumed_from > 0, big
        # the stall limit: STALL_SECONDS, or longer where the policy's throttle makes
        # one request per connection take a while (activities/cycle.py _stall_seconds)
        limit = max(STALL_SECONDS, 3 * CUT_CONNECTIONS * 4 * MiB // CUT_RATE)
        stalls = [a for a in attempts if f"no progress for {limit} s" in a.last_failure]
        assert stalls, attempts
        assert big.result.bytes_resent <= _window(), big
        await handle.execute_update("remove", result_type=ReplicationStatus)


# =========================================================================== failback between sites


def _domain_exists(name: str) -> bool:
    conn = libvirt.open("qemu:///system")
    try:
        return name in {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()


@pytest.mark.guest
@pytest.mark.timeout(900)
def test_migration_and_failback_between_sites(xsite: CrossSite, guest_image: GuestImage,
                                              tmp_path: Path) -> None:
    vm = f"transcend-xs-f-{os.getpid()}"
    try:
        asyncio.run(_failback_between_sites(xsite, guest_image, tmp_path, vm))
    finally:
        remove_domain(f"{vm}-dr")


async def _failback_between_sites(xs: CrossSite, image: GuestImage, tmp_path: Path,
                                  vm: str) -> None:
    """Migrate a guest from site a to site b, let it write there, fail back: no worker
    reaches both libvirt hosts' disks, so each pass is served at b (TLS fronts of the
    failed-over VM's backup), copied at a, and released at b; the verify hashes each
    side at its own site; the failed-over VM is removed at b."""
    p, name = "xs-fb", f"{vm}-dr"
    cat = xs.catalog()
    src, dst = xs.add_platforms(cat)
    client = await xs.client()
    with traversable(tmp_path), booted_guest(image, tmp_path, vm) as (dom, disk):
        replication = await start_protection(client, _spec(p, vm, src, dst))
        st = await wait_first_point(replication, timeout=180)
        assert st.cycles_failed == 0, f"{st.last_error}\n{xs.log_tail()}"
        mig = await client.start_workflow(
            api.MIGRATION_WORKFLOW,
            api.FailoverInput(protection=p, name=name,
                              health=HealthCheck(kind="console", pattern=XS_BOOTED,
                                                 timeout_seconds=240)),
            id=api.failover_id(p), task_queue=CONTROL_TASK_QUEUE, result_type=api.FailoverStatus)
        done = await asyncio.wait_for(mig.result(), 600)
        assert done.phase == "done" and done.instance is not None, done
        assert not dom.isActive()
        last_source = check_contiguous(read_records(disk))
        m = wait_for_console(done.instance.console_log, XS_BOOTED, 10)
        assert int(m.group(1)) == last_source, (m.group(0), last_source)
        assert Path(done.instance.overlays[0]).is_relative_to(xs.root / "replicas-b")

        await asyncio.sleep(10)  # production at site b writes records
        rx0, _ = xs.link_bytes("a")
        fb = await client.execute_workflow(
            api.FAILBACK_WORKFLOW,
            api.FailbackInput(protection=p, start_original=False, keep_failed_over=False),
            id=api.failback_id(p), task_queue=CONTROL_TASK_QUEUE, result_type=api.FailbackStatus,
            execution_timeout=timedelta(minutes=10))
        rx1, _ = xs.link_bytes("a")
        # phase done includes the verify: the sha256 of every disk, each taken at its
        # own site, were equal
        assert fb.phase == "done", fb
        assert fb.passes and all(x.mode == "tracked" for x in fb.passes), fb.passes
        assert fb.passes[0].original_bytes == 0  # a migration leaves the source clean
        written = sum(x.bytes_written for x in fb.passes)
        assert written > 0 and rx1 - rx0 >= written, (rx1 - rx0, written)
        # the records the guest wrote at site b are on the original disk now
        assert check_contiguous(read_records(disk)) > last_source
        # the failed-over VM was removed at site b, the original is production again
        assert not _domain_exists(name)
        assert cat.get_protection(p).state == ProtectionState.PROTECTING
        assert not list((xs.homes["b"] / "pull").glob("*.pid")), "a front was left at site b"
        await replication.execute_update("remove", result_type=ReplicationStatus)

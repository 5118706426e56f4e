"""The two-site network-namespace harness (tests/harness/netns.py) with real traffic.

Every test of the harness's API runs on both kinds of site link: the veth pair
(shaped with netem, or tbf + nftables where the kernel has no netem) and the
TUN delay line (tests/harness/delayline.c), which gives delay on kernels
without sch_netem.  Skips with the harness's reason where namespaces cannot be
made; the veth delay test skips where the kernel has no netem qdisc.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.netns import NamespacesUnavailable, NetemUnavailable, Site, TwoSites, two_sites

PORT = 7000  # inside the namespaces: private, cannot collide with the host

# one server for all tests, in site b: first byte of a connection picks the mode
#   e = echo until EOF;  s = sink until EOF, then reply with the byte count
#   h = hash until EOF, then reply with the SHA-256 (hex) of what arrived
SERVER = r"""
import hashlib, socket, sys, threading
def serve(c):
    with c:
        mode = c.recv(1)
        if mode == b"e":
            while d := c.recv(65536):
                c.sendall(d)
        elif mode == b"s":
            n = 0
            while d := c.recv(1 << 20):
                n += len(d)
            c.sendall(str(n).encode())
        elif mode == b"h":
            h = hashlib.sha256()
            while d := c.recv(1 << 20):
                h.update(d)
            c.sendall(h.hexdigest().encode())
s = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# client, run in site a; prints one JSON line
CLIENT = r"""
import hashlib, json, os, socket, statistics, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
arg = int(sys.argv[4]) if len(sys.argv) > 4 else 0
if mode == "connect":           # arg = timeout in ms
    t = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=arg / 1000).close()
        print(json.dumps({"ok": True, "s": time.monotonic() - t}))
    except OSError as e:
        print(json.dumps({"ok": False, "s": time.monotonic() - t, "err": repr(e)}))
elif mode == "hello":           # read what the server sends
    with socket.create_connection((host, port), timeout=5) as c:
        print(json.dumps({"got": c.recv(100).decode()}))
elif mode == "echo":            # arg = messages
    with socket.create_connection((host, port), timeout=5) as c:
        c.sendall(b"e")
        ok = True
        for i in range(arg):
            msg = f"hello {i}".encode()
            c.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += c.recv(100)
            ok = ok and got == msg
        print(json.dumps({"ok": ok}))
elif mode == "rtt":             # arg = round trips; median of 1-byte ping-pongs
    with socket.create_connection((host, port), timeout=10) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(b"e")
        rtts = []
        for _ in range(arg):
            t = time.monotonic()
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            rtts.append(time.monotonic() - t)
        print(json.dumps({"median_ms": statistics.median(rtts) * 1000}))
elif mode == "send":            # arg = bytes to send
    buf = b"\x5a" * (1 << 20)
    with socket.create_connection((host, port), timeout=30) as c:
        t = time.monotonic()
        c.sendall(b"s")
        left = arg
        while left:
            n = min(left, len(buf))
            c.sendall(buf[:n])
            left -= n
        c.shutdown(socket.SHUT_WR)
        got = int(c.recv(100))
        s = time.monotonic() - t
    print(json.dumps({"bytes": got, "s": s, "mbit": got * 8 / s / 1e6}))
elif mode == "hash":            # arg = bytes of random data to send; both sides hash
    h = hashlib.sha256()
    with socket.create_connection((host, port), timeout=60) as c:
        c.sendall(b"h")
        left = arg
        while left:
            d = os.urandom(min(left, 1 << 20))
            h.update(d)
            c.sendall(d)
            left -= len(d)
        c.shutdown(socket.SHUT_WR)
        got = c.recv(100).decode()
    print(json.dumps({"sent": h.hexdigest(), "received": got}))
"""


@pytest.fixture(params=["veth", "tun"])
def sites(request: pytest.FixtureRequest) -> Iterator[TwoSites]:
    with contextlib.ExitStack() as stack:
        try:
            s = stack.enter_context(two_sites("tns", link=request.param))
        except NamespacesUnavailable as e:
            pytest.skip(f"network namespaces unavailable: {e}")
        yield s


@pytest.fixture
def server_b(sites: TwoSites) -> subprocess.Popen[str]:
    """The echo/sink server listening in site b on its site-link address."""
    p = sites.popen("b", [sys.executable, "-c", SERVER, sites.address("b"), str(PORT)],
                    stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def client(sites: TwoSites, site: Site, *args: Any, host: str | None = None, timeout: float = 60) -> Any:
    cp = sites.run(site, [sys.executable, "-c", CLIENT, str(args[0]), host or sites.address("b"), str(PORT),
                          *map(str, args[1:])], capture_output=True, text=True, timeout=timeout)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def _ip_out(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def test_tcp_between_sites(sites: TwoSites, server_b: subprocess.Popen[str]) -> None:
    assert sites.address("a") != sites.address("b")
    assert client(sites, "a", "echo", 20)["ok"]
    r = client(sites, "a", "send", 50 << 20)
    print(f"raw site-to-site TCP: {r['mbit']:.0f} Mbit/s ({r['bytes']} bytes in {r['s']:.2f} s)")
    assert r["bytes"] == 50 << 20
    assert r["mbit"] > 50  # veth or delay line: far above any WAN rate the tests shape to


def test_sites_only_connected_by_the_site_link(sites: TwoSites) -> None:
    # no default route; only the link's /30 and the /32 to the host
    routes = sites.run("a", ["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    assert "default" not in routes
    r = client(sites, "a", "connect", 500, host=sites.uplink_address("b"))
    assert not r["ok"] and "unreachable" in r["err"].lower()


@pytest.mark.parametrize("how", ["direct", "forward"])
def test_host_service_reachable_from_both_sites(sites: TwoSites, how: str) -> None:
    bind = sites.host_address if how == "direct" else "127.0.0.1"
    lsock = socket.create_server((bind, 0))
    peers: list[str] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, peer = lsock.accept()
                peers.append(peer[0])
                with c:
                    c.sendall(b"hello from host")

    threading.Thread(target=accept, daemon=True).start()
    try:
        port = lsock.getsockname()[1]
        if how == "forward":  # a service bound to loopback, exposed by the relay
            host, port = sites.forward(0, ("127.0.0.1", port))
            assert host == sites.host_address
        for site in ("a", "b"):
            cp = sites.run(site, [sys.executable, "-c", CLIENT, "hello", sites.host_address, str(port)],
                           capture_output=True, text=True, timeout=30)
            assert cp.returncode == 0, cp.stderr
            assert json.loads(cp.stdout)["got"] == "hello from host"
        if how == "direct":
            assert peers == [sites.uplink_address("a"), sites.uplink_address("b")]
    finally:
        lsock.close()


def test_delay_raises_rtt(sites: TwoSites, server_b: subprocess.Popen[str]) -> None:
    """Delay on a's egress adds to the RTT; on b's egress too; clearing removes it."""
    base = client(sites, "a", "rtt", 20)["median_ms"]
    try:
        how = sites.netem("a", delay_ms=50)
    except NetemUnavailable as e:
        assert sites.link == "veth"  # the delay line needs no kernel support
        pytest.skip(str(e))
    delayed = client(sites, "a", "rtt", 10)["median_ms"]
    sites.netem("b", delay_ms=30)
    both = client(sites, "a", "rtt", 10)["median_ms"]
    print(f"{how}: RTT {base:.2f} ms -> {delayed:.2f} ms (a->b +50 ms) -> {both:.2f} ms (b->a +30 ms)")
    assert delayed - base >= 49  # a delay can come late, never early
    assert both - base >= 79
    sites.clear()
    assert client(sites, "a", "rtt", 10)["median_ms"] < base + 20


def test_delayed_lossy_shaped_transfer_arrives_intact(
    sites: TwoSites, server_b: subprocess.Popen[str]
) -> None:
    """Delay + 1 % loss + a rate limit on both directions at once: TCP gets
    every byte through, in order (SHA-256 of 16 MiB of random data each side)."""
    try:
        how = sites.netem("a", delay_ms=10, loss_pct=1, rate_mbit=200)
        sites.netem("b", delay_ms=10, rate_mbit=200)
    except NetemUnavailable as e:
        assert sites.link == "veth"
        pytest.skip(str(e))
    r = client(sites, "a", "hash", 16 << 20, timeout=120)
    print(f"{how}: {r}")
    assert r["sent"] == r["received"]
    if sites.delayline is not None:
        st = sites.delayline.stats()
        assert st["a"]["bytes"] >= 16 << 20 and st["a"]["dropped"] == 0, st


def _ping_loss(sites: TwoSites, count: int) -> float:
    """Share of ``count`` pings from site a to site b that got no reply."""
    cp = subprocess.run(["ip", "netns", "exec", sites.ns["a"], "ping", "-q", "-n", "-i", "0.005",
                         "-W", "1", "-c", str(count), sites.address("b")],
                        capture_output=True, text=True, check=False)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", cp.stdout)
    assert m, cp.stdout + cp.stderr
    return 1 - int(m.group(2)) / int(m.group(1))


def test_loss_drops_that_share_of_packets(sites: TwoSites) -> None:
    """20 % loss on a's egress (netem, or nftables where the kernel has no netem):
    about a fifth of the pings to b go unanswered; none once cleared."""
    how = sites.netem("a", loss_pct=20)
    try:
        lost = _ping_loss(sites, 400)
    finally:
        sites.clear()
    print(f"{how}: {lost:.1%} of 400 pings lost with 20 % loss")
    assert 0.10 < lost < 0.32, lost
    assert _ping_loss(sites, 100) <= 0.01


def test_rate_limit(sites: TwoSites, server_b: subprocess.Popen[str]) -> None:
    qdisc = sites.netem("a", rate_mbit=20)
    assert qdisc in ("netem", "tbf")
    r = client(sites, "a", "send", 20 << 20)
    print(f"{qdisc} rate 20 Mbit/s: measured {r['mbit']:.1f} Mbit/s ({r['s']:.1f} s); {sites.qdisc('a')}")
    assert 10 < r["mbit"] < 30
    sites.clear("a")
    assert "tbf" not in sites.qdisc("a") and "netem" not in sites.qdisc("a")


def test_link_down_and_up(sites: TwoSites, server_b: subprocess.Popen[str]) -> None:
    assert client(sites, "a", "connect", 2000)["ok"]
    sites.link_down()
    r = client(sites, "a", "connect", 2000)
    assert not r["ok"] and r["s"] < 2.5, r
    sites.link_up()
    assert client(sites, "a", "connect", 2000)["ok"]
    assert client(sites, "a", "echo", 3)["ok"]


def test_blackhole_stalls_and_resumes_an_established_connection(
    sites: TwoSites, server_b: subprocess.Popen[str]
) -> None:
    sites.netem("a", rate_mbit=50)  # shaping survives the cut
    # an established connection from the test process, entered into site a
    script = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(b"e" + b"1")
assert c.recv(1) == b"1"
print("connected", flush=True)
sys.stdin.readline()               # the test cuts the link meanwhile
t = time.monotonic()
c.sendall(b"2")
print("resumed" if c.recv(1) == b"2" else "bad", round(time.monotonic() - t, 2), flush=True)
"""
    p = sites.popen("a", [sys.executable, "-c", script, sites.address("b"), str(PORT)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    assert p.stdout.readline().strip() == "connected"
    sites.link_down("blackhole")
    r = client(sites, "a", "connect", 700)
    assert not r["ok"] and "timed out" in r["err"], r
    p.stdin.write("go\n")
    p.stdin.flush()
    time.sleep(1.0)  # the byte is retransmitted into the void meanwhile
    sites.link_up()
    assert "tbf" in sites.qdisc("a") or "netem" in sites.qdisc("a")
    line = p.stdout.readline().split()
    assert line[0] == "resumed", line
    assert p.wait(timeout=10) == 0
    assert client(sites, "a", "connect", 2000)["ok"]


def test_delay_line_link_goes_with_the_sites() -> None:
    """The delay-line process and its TUN devices end with the context, also
    on an exception."""
    with pytest.raises(RuntimeError, match="boom"), two_sites("tnt", link="tun") as s:
        assert s.delayline is not None
        proc = s.delayline.proc
        links = s.run("a", ["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert s.site_dev["a"] in links
        raise RuntimeError("boom")
    assert proc.poll() is not None
    assert s.ns["a"] not in _ip_out("netns", "list")
    assert all(dev not in _ip_out("-o", "link") for dev in s.site_dev.values())


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_cleanup_on_exit_exception_and_leftovers() -> None:
    prefix = "tnc"
    me = os.getpid()
    # leftovers of "crashed runs": one with a dead pid, one that had our pid
    stale = [f"{prefix}{_dead_pid()}-a", f"{prefix}{me}-b"]
    try:
        for ns in stale:
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"network namespaces unavailable: {e.stderr.decode().strip()}")
    # an orphan of the crashed run, still inside its namespace
    orphan = subprocess.Popen(["ip", "netns", "exec", stale[1], "sleep", "300"], start_new_session=True)
    names: list[str] = []
    proc: subprocess.Popen[bytes] | None = None
    with pytest.raises(RuntimeError, match="boom"), two_sites(prefix) as s:
        assert stale[0] not in _ip_out("netns", "list").split()
        assert orphan.wait(timeout=5) != 0  # killed: its namespace was removed and made afresh
        assert stale[1] == s.ns["b"]
        names = [*s.ns.values(), *s.site_dev.values(), *s.uplink_dev.values(), *s.host_dev.values()]
        proc = s.popen("a", ["sleep", "300"])
        assert s.ns["a"] in _ip_out("netns", "list")
        raise RuntimeError("boom")
    assert proc is not None and proc.poll() is not None
    netns, links, addrs = _ip_out("netns", "list"), _ip_out("-o", "link"), _ip_out("-o", "-4", "addr")
    for name in names:
        assert name not in netns and name not in links
    assert s.host_address not in addrs
    # a clean exit also cleans, and the same prefix can be reused at once
    with two_sites(prefix) as s2:
        assert s2.ns["a"] in _ip_out("netns", "list")
    assert s2.ns["a"] not in _ip_out("netns", "list") and s2.host_dev["a"] not in _ip_out("-o", "link")


def test_unprivileged_raises_namespaces_unavailable() -> None:
    """As an unprivileged user the harness raises NamespacesUnavailable with the reason."""
    if os.geteuid() != 0:
        with pytest.raises(NamespacesUnavailable), two_sites("tnu"):
            pass
        return
    code = (
        "from tests.harness.netns import NamespacesUnavailable, two_sites\n"
        "try:\n"
        "    with two_sites('tnu'): print('created')\n"
        "except NamespacesUnavailable as e: print('unavailable:', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cp = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=30,
                        env={**os.environ, "PYTHONPATH": root})
    if cp.returncode != 0 and "unavailable" not in cp.stdout:
        pytest.skip(f"cannot run as nobody here: {cp.stderr.strip()[-200:]}")
    assert cp.stdout.startswith("unavailable:"), cp.stdout + cp.stderr
    assert "not root" in cp.stdout
    print(cp.stdout.strip())

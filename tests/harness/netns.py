"""Two "sites" in network namespaces, joined by a veth pair you can shape and cut.

Used by the across-sites tests and benchmarks: a worker (or blockstream, an NBD
server, ...) runs in each namespace, the site-to-site link between them gets
delay / loss / a rate limit or is cut, and both sites can still reach a
service on the host (the Temporal dev server)::

    from tests.harness.netns import NamespacesUnavailable, NetemUnavailable, two_sites

    with two_sites("tns") as s:
        srv = s.popen("b", ["qemu-nbd", "--bind", s.address("b"), ...])
        s.run("a", ["blockstream", ...], check=True)
        s.netem("a", delay_ms=50, loss_pct=0.1)    # a -> b direction
        s.netem("b", delay_ms=50)                  # b -> a direction
        s.link_down(); s.link_up()
        s.clear()

Topology (one private /24 from 198.18.0.0/15, the RFC 2544 benchmarking
range, chosen per process and checked against the host's addresses and
routes; ``.X`` below is the last octet)::

                   site-to-site link (shaped with tc on each side's egress)
     netns <p><pid>-a                                         netns <p><pid>-b
    +------------------------+                         +------------------------+
    | lo        127.0.0.1    |                         | lo        127.0.0.1    |
    | <p><pid>sa  .1/30  ====|====== veth pair ========|==== .2/30  <p><pid>sb  |
    | <p><pid>ua  .5/32      |                         |      .6/32  <p><pid>ub |
    +-----||-----------------+                         +-----------------||-----+
          || veth (uplink, unshaped)                    veth (uplink)    ||
    ======||============================ host (root netns) ==============||=====
      <p><pid>ha  .9/32 peer .5                         .9/32 peer .6  <p><pid>hb
                          \\___ host_address = .9 (on both host ends) ___/

* The site link is the only path between the sites: the namespaces have no
  default route, only the link's /30 and a /32 to the host address over their
  uplink.  The host does not forward (nothing here touches ip_forward, NAT,
  iptables or sysctls); each namespace reaches only ``host_address`` itself.
* A host service is reachable from the sites when it listens on
  ``host_address`` or on 0.0.0.0 -- e.g. ``start_dev_server(..., host=
  "0.0.0.0")`` or ``host=s.host_address``.  A service that is already bound
  to 127.0.0.1 (a running dev server) can be exposed with ``s.forward(port)``,
  a small TCP relay from ``host_address:port`` to ``127.0.0.1:port`` in this
  process.
* ``<p>`` is the prefix (1-6 lower-case letters/digits), ``<pid>`` this
  process's id, so names are unique per process and fit the 15-character
  interface-name limit.  Leftovers of a crashed run with the same prefix (its
  pid dead, or equal to ours) are removed before anything is created.

Commands used (iproute2)::

    ip netns add NAME / ip netns del NAME / ip netns pids NAME / ip netns exec NAME CMD...
    ip link add name SA netns A type veth peer name SB netns B
    ip link add name HA type veth peer name UA netns A
    ip -n A addr add 198.18.x.1/30 dev SA          ip -n A link set lo|SA|UA up
    ip addr add H/32 peer 198.18.x.5/32 dev HA      ip -n A addr add 198.18.x.5/32 peer H/32 dev UA
    tc -n A qdisc replace dev SA root netem delay 50ms loss 0.1% rate 100mbit
    tc -n A qdisc replace dev SA root tbf rate 20mbit ...   (rate only, without sch_netem; tun link)
    tc -n A qdisc replace dev SA root pfifo limit 0          (link_down(mode="blackhole"))
    tc -n A qdisc del dev SA root                           (clear)
    ip -n A link set SA down / up                              (link_down() / link_up())

Shaping acts on a site's *egress* on the site link: ``netem("a", delay_ms=50)``
delays a->b packets only (the RTT grows by 50 ms); shape both sites for a
symmetric WAN.  ``netem`` needs the kernel's sch_netem (``modprobe sch_netem``
is tried); without it, a pure rate limit falls back to ``tbf``, loss to an
nftables rule, and delay raises :class:`NetemUnavailable` -- on a veth link.

``two_sites(prefix, link="tun")`` makes the site link a *delay line* instead of
the veth pair: a TUN device in each namespace (same names and addresses), both
owned by a small C process (delayline.c, compiled on first use into
/var/cache/transcend-test-tools) that moves every packet from one to the other
after that direction's delay.  It needs no kernel support beyond TUN, so delay
works where sch_netem is missing; rate (tbf on the TUN device, before the
delay), loss (nftables), ``link_down`` in both modes and ``qdisc`` behave as on
a veth.  It carries several Gbit/s here, far above the rates the benchmark
shapes to; ``delayline.stats()`` counts packets, bytes, queue drops per
direction.  Packets keep their order; a direction queues at most 64 MiB.

Everything fails with :class:`NamespacesUnavailable` (not root, no
CAP_NET_ADMIN/CAP_SYS_ADMIN, no ``ip``) when the namespaces cannot be made.

On exit -- normally, on an exception or on KeyboardInterrupt (SIGINT is held
back while cleaning up) -- processes started with ``popen`` get SIGTERM to
their session, then everything still inside the namespaces gets SIGKILL; the
veths and the namespaces are deleted and the relays closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "LinkKind",
    "NamespacesUnavailable",
    "NetemUnavailable",
    "Site",
    "TwoSites",
    "two_sites",
]

Site = Literal["a", "b"]
SITES: tuple[Site, Site] = ("a", "b")
LinkKind = Literal["veth", "tun"]

# RFC 2544 benchmarking range: 512 /24 blocks, one per harness instance.
_POOL = ipaddress.IPv4Network("198.18.0.0/15")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,5}$")
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()
_CMD_TIMEOUT = 20.0
_DELAYLINE_SRC = Path(__file__).with_name("delayline.c")
_TOOLS_CACHE = Path(os.environ.get("TRANSCEND_TEST_TOOLS", "/var/cache/transcend-test-tools"))
_TUN_MTU = 1500
_TUN_QUEUE_BYTES = 64 << 20  # per direction: > 1 Gbit/s x 0.5 s


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be created here; the message says why."""


class NetemUnavailable(RuntimeError):
    """The kernel has no netem qdisc, so delay/loss cannot be emulated."""


class _CmdError(RuntimeError):
    def __init__(self, argv: Sequence[str], rc: int, stderr: str) -> None:
        super().__init__(f"`{' '.join(argv)}` failed (rc={rc}): {stderr.strip()}")
        self.argv = list(argv)
        self.rc = rc
        self.stderr = stderr


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *args]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    if check and cp.returncode != 0:
        raise _CmdError(argv, cp.returncode, cp.stderr)
    return cp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _root_links() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        # "12: name@peer: <...>" or "12: name@if11: <...>"
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _kill_netns_procs(ns: str, grace: float = 0.0) -> None:
    """SIGTERM (when grace > 0), then SIGKILL, every process inside ``ns``."""
    sigs = [signal.SIGTERM, signal.SIGKILL] if grace > 0 else [signal.SIGKILL]
    for sig in sigs:
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            if not any(_pid_alive(p) and not _is_zombie(p) for p in pids):
                return
            time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _remove_leftovers(prefix: str, own: str) -> list[str]:
    """Delete namespaces/links named ``<prefix><pid>...`` whose pid is dead, and
    those named like ``own`` (the base about to be created: a crashed earlier
    run that had our pid)."""
    me = os.getpid()
    removed: list[str] = []

    def stale(pid: int, base: str) -> bool:
        if base == own:
            return True
        return pid != me and not _pid_alive(pid)

    ns_re = re.compile(rf"^({re.escape(prefix)}(\d+))-[ab]$")
    for ns in _netns_names():
        m = ns_re.match(ns)
        if not m or not stale(int(m.group(2)), m.group(1)):
            continue
        _kill_netns_procs(ns)
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
    link_re = re.compile(rf"^({re.escape(prefix)}(\d+))[hsu][ab]$")
    for link in _root_links():
        m = link_re.match(link)
        if not m or not stale(int(m.group(2)), m.group(1)):
            continue
        _ip("link", "del", link, check=False)
        removed.append(link)
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks the root namespace already has addresses or routes in."""
    nets: list[ipaddress.IPv4Network] = []
    for line in _ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        toks = line.split()
        if "inet" in toks:
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(toks[toks.index("inet") + 1], strict=False))
    route_types = {"local", "broadcast", "unicast", "multicast", "blackhole",
                   "unreachable", "prohibit", "throw", "anycast", "nat"}
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        toks = line.split()
        if not toks:
            continue
        dest = toks[1] if toks[0] in route_types and len(toks) > 1 else toks[0]
        if dest == "default":
            continue
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.IPv4Network(dest, strict=False))
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    blocks: list[ipaddress.IPv4Network] = list(_POOL.subnets(new_prefix=24))
    used = _used_networks()
    start = os.getpid() % len(blocks)
    for i in range(len(blocks)):
        cand = blocks[(start + i) % len(blocks)]
        if not any(cand.overlaps(u) for u in used):
            return cand
    raise NamespacesUnavailable(f"no free /24 left in {_POOL} on this host")


class _Relay:
    """TCP relay listen_addr -> target, threads in this process (root netns)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self._lsock = socket.create_server(listen, reuse_port=False)
        self.address: tuple[str, int] = self._lsock.getsockname()[:2]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"relay-{self.address[1]}").start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self._lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=5)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            with self._lock:
                if self._closed:
                    c.close()
                    u.close()
                    return
                self._conns += [c, u]
            for src, dst in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        with contextlib.suppress(OSError):
            self._lsock.shutdown(socket.SHUT_RDWR)
        self._lsock.close()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _delayline_binary() -> Path:
    """delayline.c compiled once per source version (cached by its hash)."""
    src = _DELAYLINE_SRC.read_bytes()
    out = _TOOLS_CACHE / f"delayline-{hashlib.sha256(src).hexdigest()[:12]}"
    if out.exists():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise NetemUnavailable("a delay-line link needs a C compiler (apt-get install -y gcc)")
    _TOOLS_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cp = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(_DELAYLINE_SRC)],
                        capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        raise NetemUnavailable(f"cannot compile {_DELAYLINE_SRC.name}: {cp.stderr.strip()[-500:]}")
    tmp.replace(out)  # atomic: a concurrent build of the same source is identical
    return out


class _DelayLine:
    """The ``delayline`` process that is the site link when ``link="tun"``:
    it owns both TUN devices and delays each direction (see delayline.c)."""

    def __init__(self, ns: dict[Site, str], dev: dict[Site, str]) -> None:
        argv = [str(_delayline_binary())]
        for site in SITES:
            argv += [f"/run/netns/{ns[site]}", dev[site]]
        argv += [str(_TUN_MTU), str(_TUN_QUEUE_BYTES)]
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        first = self._readline(10.0)
        if first != "ready":
            err = self.close()
            raise NamespacesUnavailable(f"the delay-line link did not start ({first!r}): {err}")

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else ""

    def _command(self, line: str) -> str:
        with self._lock:
            assert self.proc.stdin is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the delay-line process exited ({self.proc.returncode})")
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            reply = self._readline(5.0)
        if not reply or reply.startswith("error"):
            raise RuntimeError(f"delayline {line!r}: {reply or 'no answer'}")
        return reply

    def set_delay(self, site: Site, ms: float) -> None:
        self._command(f"delay {site} {ms:g}")

    def stats(self) -> dict[str, dict[str, float]]:
        """Per direction ("a" = a -> b): delay_ms, packets, bytes, queued,
        dropped (queue full), write_errors (receiving device down)."""
        stats: dict[str, dict[str, float]] = json.loads(self._command("stats"))
        return stats

    def close(self) -> str:
        """Stop the process (its devices vanish with it); returns its stderr."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: it exits
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=3)
        err = self.proc.stderr.read() if self.proc.stderr is not None else ""
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return err.strip()


class TwoSites:
    """Two namespaces ``a`` and ``b``; see the module docstring.  Made by
    :func:`two_sites`, which also tears it down."""

    def __init__(self, prefix: str, link: LinkKind = "veth") -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r}: 1-6 characters, [a-z][a-z0-9]*")
        if link not in ("veth", "tun"):
            raise ValueError(f"link {link!r}: 'veth' or 'tun'")
        self.prefix = prefix
        self.link: LinkKind = link
        self.delayline: _DelayLine | None = None
        self.base = f"{prefix}{os.getpid()}"
        self.ns: dict[Site, str] = {s: f"{self.base}-{s}" for s in SITES}
        self.site_dev: dict[Site, str] = {s: f"{self.base}s{s}" for s in SITES}
        self.uplink_dev: dict[Site, str] = {s: f"{self.base}u{s}" for s in SITES}
        self.host_dev: dict[Site, str] = {s: f"{self.base}h{s}" for s in SITES}
        self.subnet: ipaddress.IPv4Network = _POOL  # set in _setup
        self._addr: dict[Site, str] = {}
        self._uplink_addr: dict[Site, str] = {}
        self.host_address = ""
        self._procs: list[subprocess.Popen[Any]] = []
        self._relays: list[_Relay] = []
        self._shaping: dict[Site, list[str] | None] = {"a": None, "b": None}
        self._blackholed = False
        self._netem_ok: bool | None = None
        self._created_ns: list[str] = []

    # -- addresses ------------------------------------------------------------

    def address(self, site: Site) -> str:
        """The site's IPv4 address on the site-to-site link."""
        return self._addr[site]

    def uplink_address(self, site: Site) -> str:
        """The site's source address towards ``host_address`` (what a host
        service sees as the peer)."""
        return self._uplink_addr[site]

    # -- processes ------------------------------------------------------------

    def _argv(self, site: Site, cmd: Sequence[str]) -> list[str]:
        if isinstance(cmd, str):
            raise TypeError("cmd must be a sequence of arguments, not a string")
        return ["ip", "netns", "exec", self.ns[site], *cmd]

    def run(self, site: Site, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside the site's namespace."""
        return subprocess.run(self._argv(site, cmd), **kwargs)

    def popen(self, site: Site, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside the site's namespace, in its own session;
        stopped when the context exits."""
        kwargs.setdefault("start_new_session", True)
        p: subprocess.Popen[Any] = subprocess.Popen(self._argv(site, cmd), **kwargs)
        self._procs.append(p)
        return p

    # -- shaping --------------------------------------------------------------

    def _tc(self, site: Site, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _tc(self.ns[site], *args, check=check)

    def netem_available(self) -> bool:
        """Whether the kernel has the netem qdisc (probed once, ``modprobe`` tried)."""
        if self._netem_ok is None:
            subprocess.run(["modprobe", "sch_netem"], capture_output=True, check=False)
            dev = self.uplink_dev["a"]  # probe on the unshaped uplink, then restore
            cp = self._tc("a", "qdisc", "replace", "dev", dev, "root", "netem", check=False)
            self._netem_ok = cp.returncode == 0
            self._tc("a", "qdisc", "del", "dev", dev, "root", check=False)
        return self._netem_ok

    def netem(self, site: Site, delay_ms: float = 0, loss_pct: float = 0.0,
              rate_mbit: float | None = None) -> str:
        """Shape ``site``'s egress on the site link (``tc qdisc replace ... root
        netem``); all defaults = :meth:`clear`.  Returns the qdisc used: "netem",
        or on a kernel without sch_netem "tbf" for a rate limit and "nft" (plus
        "+tbf" with a rate) for loss: an nftables rule in the site's namespace
        drops that share of the packets leaving on the site link, at random.
        Raises :class:`NetemUnavailable` for delay without sch_netem."""
        if delay_ms < 0 or not 0 <= loss_pct <= 100 or (rate_mbit is not None and rate_mbit <= 0):
            raise ValueError("delay_ms >= 0, 0 <= loss_pct <= 100, rate_mbit > 0")
        if not delay_ms and not loss_pct and rate_mbit is None:
            self.clear(site)
            return "none"
        self._drop(site, 0.0)
        if self.delayline is not None:
            return self._shape_delayline(site, delay_ms, loss_pct, rate_mbit)
        if self.netem_available():
            qdisc = ["netem", "limit", "100000"]
            if delay_ms:
                qdisc += ["delay", f"{delay_ms}ms"]
            if loss_pct:
                qdisc += ["loss", f"{loss_pct}%"]
            if rate_mbit is not None:
                qdisc += ["rate", f"{rate_mbit}mbit"]
        elif delay_ms:
            raise NetemUnavailable(
                "the kernel has no netem qdisc (CONFIG_NET_SCH_NETEM off, `modprobe sch_netem` "
                "failed): delay cannot be emulated on a veth link here; make the sites with "
                "two_sites(..., link=\"tun\") for a user-space delay line; rate limits fall back "
                "to tbf, loss to an nftables rule"
            )
        elif rate_mbit is None:
            self._drop(site, loss_pct)
            return "nft"
        else:
            qdisc = _tbf(rate_mbit)
            if loss_pct:
                self._drop(site, loss_pct)
        self._shaping[site] = qdisc
        self._apply_shaping(site)
        return qdisc[0] if not loss_pct or qdisc[0] == "netem" else f"nft+{qdisc[0]}"

    def _shape_delayline(self, site: Site, delay_ms: float, loss_pct: float,
                         rate_mbit: float | None) -> str:
        """:meth:`netem` on a TUN link: the delay in the delay-line process,
        the rate with tbf on the TUN device (before the delay, as netem's
        order), loss with the nftables rule."""
        assert self.delayline is not None
        self.delayline.set_delay(site, delay_ms)
        self._drop(site, loss_pct)
        qdisc = None if rate_mbit is None else _tbf(rate_mbit)
        self._shaping[site] = qdisc
        self._apply_shaping(site)
        used = ["nft"] if loss_pct else []
        used += ["delayline"] if delay_ms else []
        used += ["tbf"] if qdisc else []
        return "+".join(used)

    def _apply_shaping(self, site: Site) -> None:
        """Put ``site``'s shaping (or none) on its link end, unless the link is
        black-holed: :meth:`link_up` applies it then."""
        if self._blackholed:
            return
        shaping = self._shaping[site]
        if shaping is None:
            self._tc(site, "qdisc", "del", "dev", self.site_dev[site], "root", check=False)
        else:
            self._tc(site, "qdisc", "replace", "dev", self.site_dev[site], "root", *shaping)

    def _drop(self, site: Site, loss_pct: float) -> None:
        """Drop ``loss_pct`` % of the packets leaving on the site link, at random
        (nftables ``numgen random``, in parts per 100,000); 0 removes the rule."""
        ns = self.ns[site]
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet",
                        "transcend_loss"], capture_output=True, check=False)
        if not loss_pct:
            return
        per_100k = max(1, round(loss_pct * 1000))
        rules = (f"table inet transcend_loss {{\n chain out {{\n"
                 f"  type filter hook postrouting priority 0;\n"
                 f"  oifname \"{self.site_dev[site]}\" numgen random mod 100000 < {per_100k} drop\n"
                 f" }}\n}}\n")
        cp = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules,
                            capture_output=True, text=True, check=False)
        if cp.returncode != 0:
            raise NetemUnavailable(f"no netem and nftables failed ({cp.stderr.strip()}): loss "
                                   "cannot be emulated here; install nftables")

    def clear(self, site: Site | None = None) -> None:
        """Remove shaping from one site (or both)."""
        for s in SITES if site is None else (site,):
            self._shaping[s] = None
            self._drop(s, 0.0)
            if self.delayline is not None:
                self.delayline.set_delay(s, 0.0)
            self._apply_shaping(s)

    def qdisc(self, site: Site) -> str:
        """``tc qdisc show`` for the site's link end (for logs and asserts),
        plus the delay line's delay on a TUN link."""
        shown = self._tc(site, "qdisc", "show", "dev", self.site_dev[site]).stdout.strip()
        if self.delayline is not None:
            other = "b" if site == "a" else "a"
            shown += f"\ndelayline {site}->{other} delay {self.delayline.stats()[site]['delay_ms']:g}ms"
        return shown

    # -- link -----------------------------------------------------------------

    def link_down(self, mode: Literal["down", "blackhole"] = "down") -> None:
        """Cut the site-to-site link.  ``down``: both veth ends down -- the
        link's routes go, new connections fail at once (ENETUNREACH), sends on
        established ones fail.  ``blackhole``: the link stays up but each end
        drops everything it sends (``pfifo limit 0``) -- connects time out and
        established connections stall and resume after :meth:`link_up`, like
        a cut WAN."""
        if mode == "down":
            for s in SITES:
                _ip("-n", self.ns[s], "link", "set", self.site_dev[s], "down")
        elif mode == "blackhole":
            self._blackholed = True
            for s in SITES:
                self._tc(s, "qdisc", "replace", "dev", self.site_dev[s], "root", "pfifo", "limit", "0")
        else:
            raise ValueError(f"mode {mode!r}")

    def link_up(self) -> None:
        """Undo :meth:`link_down` (either mode); shaping set with :meth:`netem` is kept."""
        for s in SITES:
            _ip("-n", self.ns[s], "link", "set", self.site_dev[s], "up")
        if self._blackholed:
            self._blackholed = False
            for s in SITES:
                self._apply_shaping(s)

    # -- host services --------------------------------------------------------

    def forward(self, port: int, target: tuple[str, int] | None = None) -> tuple[str, int]:
        """Relay ``host_address:port`` to ``target`` (default ``127.0.0.1:port``)
        from this process, so a host service bound to loopback is reachable from
        both sites.  ``port=0`` picks a free port.  Returns the listening address."""
        relay = _Relay((self.host_address, port), target or ("127.0.0.1", port))
        self._relays.append(relay)
        return relay.address

    # -- lifecycle ------------------------------------------------------------

    def _setup(self) -> None:
        if shutil.which("ip") is None:
            raise NamespacesUnavailable("iproute2's `ip` is not installed")
        _remove_leftovers(self.prefix, own=self.base)
        for s in SITES:
            try:
                _ip("netns", "add", self.ns[s])
            except _CmdError as e:
                if "File exists" in e.stderr:  # not an environment problem: fail, do not skip
                    raise
                why = "" if os.geteuid() == 0 else f" (running as uid {os.geteuid()}, not root)"
                raise NamespacesUnavailable(f"cannot create network namespaces: {e}{why}") from e
            except OSError as e:
                raise NamespacesUnavailable(f"cannot run `ip netns add`: {e}") from e
            self._created_ns.append(self.ns[s])
        self.subnet = sn = _pick_subnet()
        hosts = list(sn.hosts())  # .1 ... .254
        self._addr = {"a": str(hosts[0]), "b": str(hosts[1])}
        self._uplink_addr = {"a": str(hosts[4]), "b": str(hosts[5])}
        self.host_address = str(hosts[8])
        a, b = self.ns["a"], self.ns["b"]
        if self.link == "tun":
            self.delayline = _DelayLine(self.ns, self.site_dev)
        else:
            try:
                _ip("link", "add", "name", self.site_dev["a"], "netns", a, "type", "veth",
                    "peer", "name", self.site_dev["b"], "netns", b)
            except _CmdError as e:
                raise NamespacesUnavailable(f"cannot create a veth pair between namespaces: {e}") from e
        for s in SITES:
            ns = self.ns[s]
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self._addr[s]}/30", "dev", self.site_dev[s])
            if self.link == "tun":  # a deeper queue than TUN's 500 packets for a 1 Gbit/s link
                _ip("-n", ns, "link", "set", self.site_dev[s], "mtu", str(_TUN_MTU), "txqueuelen", "10000")
            _ip("-n", ns, "link", "set", self.site_dev[s], "up")
            # uplink to the host: created directly with one end in the namespace
            _ip("link", "add", "name", self.host_dev[s], "type", "veth",
                "peer", "name", self.uplink_dev[s], "netns", ns)
            _ip("link", "set", "dev", self.host_dev[s], "addrgenmode", "none", check=False)
            _ip("addr", "add", f"{self.host_address}/32", "peer", f"{self._uplink_addr[s]}/32",
                "dev", self.host_dev[s])
            _ip("link", "set", self.host_dev[s], "up")
            _ip("-n", ns, "addr", "add", f"{self._uplink_addr[s]}/32", "peer", f"{self.host_address}/32",
                "dev", self.uplink_dev[s])
            _ip("-n", ns, "link", "set", self.uplink_dev[s], "up")

    def _stop_procs(self) -> None:
        for p in self._procs:
            if p.poll() is not None:
                continue
            try:
                if os.getpgid(p.pid) == p.pid:
                    os.killpg(p.pid, signal.SIGTERM)
                else:
                    p.terminate()
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 3.0
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.01, deadline - time.monotonic()))
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if os.getpgid(p.pid) == p.pid:
                        os.killpg(p.pid, signal.SIGKILL)
                    else:
                        p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=2)
        for ns in self._created_ns:
            _kill_netns_procs(ns, grace=0.5)

    def close(self) -> None:
        """Tear everything down; safe to call twice."""
        for r in self._relays:
            r.close()
        self._relays.clear()
        self._stop_procs()
        if self.delayline is not None:
            self.delayline.close()
            self.delayline = None
        for s in SITES:
            _ip("link", "del", self.host_dev[s], check=False)
            if self.ns[s] in self._created_ns:
                _ip("-n", self.ns[s], "link", "del", self.site_dev[s], check=False)
        for ns in self._created_ns:
            _ip("netns", "del", ns, check=False)
        self._created_ns.clear()


def _tbf(rate_mbit: float) -> list[str]:
    rate_bytes = rate_mbit * 1e6 / 8
    # burst >= one 64 KiB GSO segment (tbf splits larger ones); ~10 ms of data
    burst = max(int(rate_bytes * 0.01), 65536)
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"]


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["tc", "-n", ns, *args]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    if check and cp.returncode != 0:
        raise _CmdError(argv, cp.returncode, cp.stderr)
    return cp


@contextlib.contextmanager
def two_sites(prefix: str = "tns", link: LinkKind = "veth") -> Iterator[TwoSites]:
    """Create the two-site topology (see the module docstring), yield it,
    always tear it down.  ``link="tun"`` makes the site link a delay line
    (TUN devices joined in user space) so delay works without sch_netem.
    Raises :class:`NamespacesUnavailable` when network namespaces cannot be
    made here."""
    sites = TwoSites(prefix, link)
    with _ACTIVE_LOCK:
        if sites.base in _ACTIVE:
            raise ValueError(f"two_sites({prefix!r}) is already active in this process")
        _ACTIVE.add(sites.base)
    try:
        try:
            sites._setup()
            yield sites
        finally:
            # hold SIGINT back so a second Ctrl-C cannot leave namespaces behind
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                sites.close()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(sites.base)

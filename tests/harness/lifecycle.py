"""libvirt lifecycle events of some domains, timestamped as they arrive: when they
were suspended together (a group's one instant), stopped or started (an order)."""

from __future__ import annotations

import contextlib
import threading
import time

import libvirt

_event_loop: threading.Thread | None = None


def _ensure_event_loop() -> None:
    """libvirt's default event loop, run by a thread until the process ends. Once it is
    registered, every later connection of this process (other tests' too) negotiates
    keepalive, so the loop must never stop: a connection whose keepalives go
    unanswered is closed by libvirtd ("Cannot write data: Broken pipe")."""
    global _event_loop
    if _event_loop is None:
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_loop = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_loop.start()


class Lifecycle:
    """Lifecycle events of some domains (suspended, resumed, started, stopped, ...),
    timestamped (time.monotonic) as they arrive."""

    def __init__(self, names: set[str]) -> None:
        _ensure_event_loop()
        self.names = names
        self.events: list[tuple[float, str, int]] = []
        self.conn = libvirt.open("qemu:///system")
        self._cb = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None)

    def _on_event(self, _conn: object, dom: libvirt.virDomain, event: int, _detail: int,
                  _opaque: object) -> None:
        if dom.name() in self.names:
            self.events.append((time.monotonic(), dom.name(), event))

    def first(self, name: str, event: int, after: float = 0.0) -> float | None:
        """When ``name`` first had ``event`` (a VIR_DOMAIN_EVENT_*) after ``after``."""
        return next((t for t, n, ev in self.events if n == name and ev == event and t >= after),
                    None)

    def paused_windows(self, name: str) -> list[tuple[float, float]]:
        windows, start = [], None
        for t, n, ev in self.events:
            if n != name:
                continue
            if ev == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
                start = t
            elif ev == libvirt.VIR_DOMAIN_EVENT_RESUMED and start is not None:
                windows.append((start, t))
                start = None
        return windows

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.domainEventDeregisterAny(self._cb)
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()


def together(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    """Some pause of ``a`` overlaps some pause of ``b``."""
    return any(max(s1, s2) < min(e1, e2) for s1, e1 in a for s2, e2 in b)

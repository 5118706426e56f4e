"""Does a platform's config and credentials work? (``transcend platform check``.)

Each role the platform's kind has (source, target) is constructed from the config and
asked: its ``check()`` where the connector implements ConnectivityCheck, else the
inventory (a source) or the construction alone (a target)."""

from __future__ import annotations

from dataclasses import dataclass

from connectors import registry
from connectors.base import ConnectivityCheck
from transcend.models import PlatformInfo


@dataclass(frozen=True)
class RoleCheck:
    role: str  # "source" or "target"
    ok: bool
    lines: list[str]


def check_platform(info: PlatformInfo, secret: dict[str, str]) -> list[RoleCheck]:
    has_source, has_target = registry.known_kinds().get(str(info.kind), (False, False))
    out = []
    for role, present, make in (("source", has_source, registry.source_for),
                                ("target", has_target, registry.target_for)):
        if not present:
            continue
        try:
            connector = make(info, secret)
            try:
                if isinstance(connector, ConnectivityCheck):
                    lines = connector.check()
                elif role == "source":
                    lines = [f"inventory: {len(connector.inventory())} VM(s)"]  # type: ignore[union-attr]
                else:
                    lines = ["the connector accepts the config (it has no connectivity check)"]
            finally:
                close = getattr(connector, "close", None) if role == "source" else \
                    getattr(connector, "close_session", None)
                if callable(close):
                    close()
            out.append(RoleCheck(role, True, lines))
        except Exception as e:  # every failure is the answer, per role
            out.append(RoleCheck(role, False, [str(e) or type(e).__name__]))
    return out

"""Pick the connector class for a platform kind.

Imports are lazy so that a worker at a site without, say, pyvmomi configured
still starts; asking for a kind that has no connector yet is a PermanentError
that says so.
"""

from __future__ import annotations

from connectors.base import PermanentError, Source, Target
from transcend.models import PlatformInfo, PlatformKind


def source_for(info: PlatformInfo, secret: dict[str, str]) -> Source:
    if info.kind == PlatformKind.KVM:
        from connectors.kvm.source import KvmSource

        return KvmSource(info, secret)
    raise PermanentError(
        f"platform {info.name!r} is of kind {info.kind.value!r}, which has no source "
        "connector in this version (supported as source: kvm)"
    )


def target_for(info: PlatformInfo, secret: dict[str, str]) -> Target:
    if info.kind == PlatformKind.KVM:
        from connectors.kvm.target import KvmTarget

        return KvmTarget(info, secret)
    raise PermanentError(
        f"platform {info.name!r} is of kind {info.kind.value!r}, which has no target "
        "connector in this version (supported as target: kvm)"
    )

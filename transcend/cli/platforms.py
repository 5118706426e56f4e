"""Commands for platforms: platform definitions and their VMs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError

from connectors import registry
from transcend.cli.common import (
    _catalog,
    _human_bytes,
    _pairs,
    fail,
    main,
)
from transcend.models import PlatformSpec
from transcend.validation import describe

if TYPE_CHECKING:
    from connectors.check import RoleCheck

# ------------------------------------------------------------------ platforms


@main.group()
def platform() -> None:
    """Platforms: endpoints with credentials (kept encrypted in the catalog)."""


@platform.command("add")
@click.argument("name")
@click.option("--kind", required=True,
              help="the connector kind: a built-in one (kvm, vmware) or one a plugin registers")
@click.option("--site", default="local", show_default=True)
@click.option("--config", "config", multiple=True, help="KEY=VALUE (e.g. uri=qemu:///system)")
@click.option("--secret", "secret", multiple=True, help="KEY=VALUE credential, stored encrypted")
@click.option("--replace", is_flag=True)
@click.option("--check", "check", is_flag=True,
              help="connect with the config and credentials first; save only if that works")
def platform_add(name: str, kind: str, site: str, config: tuple[str, ...],
                 secret: tuple[str, ...], replace: bool, check: bool) -> None:
    try:
        spec = PlatformSpec(name=name, kind=kind, site=site,
                            config=_pairs(config, "--config"), secret=_pairs(secret, "--secret"))
    except ValidationError as e:
        fail(f"platform {name!r} not saved: {describe(e, PlatformSpec)}")
        return
    try:
        registry.validate_config(spec.kind, spec.config)
    except ValueError as e:
        fail(f"platform {name!r} not saved: {e}")
        return
    if check:
        from connectors.check import check_platform
        from transcend.models import PlatformInfo

        info = PlatformInfo(name=spec.name, kind=spec.kind, site=spec.site, config=spec.config)
        if not _report_checks(name, check_platform(info, spec.secret)):
            fail(f"platform {name!r} not saved: the check failed (see above); fix the config "
                 "or credentials, or save without --check")
            return
    known = registry.known_kinds()
    if kind not in known:
        # Where the workers load a plugin this process does not, the kind is still valid:
        # say so rather than refuse (the worker refuses it if nobody serves it).
        click.echo(f"note: no connector for kind {kind!r} is loaded here (known: "
                   f"{', '.join(known)}); the workers must load its plugin", err=True)
    try:
        info = _catalog().add_platform(spec, replace=replace)
    except Exception as e:
        fail(str(e))
        return
    click.echo(f"platform {info.name} ({info.kind}, site {info.site}) saved")


def _report_checks(name: str, results: list[RoleCheck]) -> bool:
    for r in results:
        mark = "ok" if r.ok else "FAILED"
        click.echo(f"{name} as {r.role}: {mark}")
        for line in r.lines:
            click.echo(f"  {line}")
    return bool(results) and all(r.ok for r in results)


@platform.command("check")
@click.argument("name")
def platform_check(name: str) -> None:
    """Connect to a saved platform with its config and credentials, as each role it has
    (source, target), and say what was reached or what failed."""
    from connectors.check import check_platform

    cat = _catalog()
    try:
        info, secret = cat.get_platform(name), cat.platform_secret(name)
    except Exception as e:
        fail(str(e))
        return
    if not _report_checks(name, check_platform(info, secret)):
        fail(f"platform {name!r}: the check failed (see above)")


@platform.command("list")
def platform_list() -> None:
    for p in _catalog().list_platforms():
        click.echo(f"{p.name:20} {p.kind:10} site={p.site:10} {json.dumps(p.config)}")


@main.command()
@click.argument("platform_name")
def workloads(platform_name: str) -> None:
    """List the VMs a source platform offers."""
    from connectors.registry import source_for

    cat = _catalog()
    try:
        src = source_for(cat.get_platform(platform_name), cat.platform_secret(platform_name))
        items = src.inventory()
    except Exception as e:
        fail(str(e))
        return
    for w in items:
        disks = ", ".join(f"{d.id}:{_human_bytes(d.size)}" for d in w.disks)
        click.echo(f"{w.name:24} {w.power_state:9} cpus={w.cpus} mem={w.memory_mib}MiB "
                   f"fw={w.firmware} disks=[{disks}] id={w.ref.id}")

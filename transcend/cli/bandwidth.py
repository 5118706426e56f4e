"""Commands for this site's bandwidth policy."""

from __future__ import annotations

import json
from pathlib import Path

import click
from pydantic import ValidationError

from transcend.cli.common import (
    _parse_size,
    fail,
    input_error,
    main,
)


@main.group()
def bandwidth() -> None:
    """This site's bandwidth: one limit shared by every copy its worker runs, divided
    by protection priority (critical 4 : normal 2 : low 1), with time-of-day windows.
    Changes reach running copies within a second."""


def _bandwidth_files() -> tuple[Path, Path]:
    from transcend.bandwidth import policy_path, status_path
    from transcend.config import settings

    home = settings().home
    return policy_path(home), status_path(home)


@bandwidth.command("show")
def bandwidth_show() -> None:
    """The policy, and what the worker uses now (its status file)."""

    from transcend.bandwidth import load_policy

    policy_file, status_file = _bandwidth_files()
    try:
        policy = load_policy(policy_file)
    except ValueError as e:
        fail(str(e))
        return

    def rate(v: float | None) -> str:
        return "unlimited" if v is None else f"{v / 2**20:.1f} MiB/s"

    click.echo(f"site limit: {rate(policy.limit_bytes_per_s)}  ({policy_file})")
    for w in policy.windows:
        click.echo(f"  window {','.join(w.days)} {w.start}-{w.end}: {rate(w.limit_bytes_per_s)}")
    click.echo("weights: " + ", ".join(f"{k.value} {v}" for k, v in policy.weights.items()))
    if not status_file.exists():
        click.echo("in use: no status yet (the worker writes it while copies run)")
        return
    st = json.loads(status_file.read_text())
    click.echo(f"in use at {st['at']}: {rate(st['in_use_bytes_per_s'])} of "
               f"{rate(st['limit_bytes_per_s'])} ({st['limit_from']})"
               + (f"; error: {st['error']}" if st.get("error") else ""))
    for s in st["streams"]:
        click.echo(f"  {s['name']:<40} {s['priority']:<8} share {rate(s['share_bytes_per_s'])}, "
                   f"rate {rate(s['rate_bytes_per_s'])}")


@bandwidth.command("set")
@click.option("--limit", default=None, help="site limit outside windows, bytes/s (100M, 1G)")
@click.option("--unlimited", is_flag=True, help="no site limit outside windows")
@click.option("--window", "windows", multiple=True, metavar="'[DAYS] HH:MM-HH:MM RATE'",
              help="a window with its own limit, e.g. 'mon-fri 08:00-18:00 20M' (repeat; the "
                   "first that matches wins; replaces the windows)")
@click.option("--clear-windows", is_flag=True, help="remove every window")
@click.option("--weight", "weights", multiple=True, metavar="PRIORITY=N",
              help="priority weight, e.g. critical=8 (default critical 4, normal 2, low 1)")
def bandwidth_set(limit: str | None, unlimited: bool, windows: tuple[str, ...],
                  clear_windows: bool, weights: tuple[str, ...]) -> None:
    """Change the policy; everything not given stays as it is."""
    from transcend.bandwidth import SiteBandwidthPolicy, load_policy, parse_window, save_policy
    from transcend.models import Priority

    policy_file, _ = _bandwidth_files()
    try:
        policy = load_policy(policy_file) if policy_file.exists() else None
    except ValueError:
        policy = None  # a broken file is replaced by what is given now
    data = (policy or SiteBandwidthPolicy()).model_dump()
    try:
        if limit and unlimited:
            raise ValueError("give --limit or --unlimited, not both")
        if limit:
            data["limit_bytes_per_s"] = _parse_size(limit)
        if unlimited:
            data["limit_bytes_per_s"] = None
        if clear_windows:
            data["windows"] = []
        if windows:
            data["windows"] = [parse_window(w, _parse_size).model_dump() for w in windows]
        for w in weights:
            key, _, value = w.partition("=")
            data["weights"][Priority(key.strip().lower())] = int(value)
        new = SiteBandwidthPolicy.model_validate(data)
    except (ValueError, ValidationError) as e:
        fail(input_error(e))
        return
    save_policy(policy_file, new)
    click.echo(f"written {policy_file}; a running worker applies it within a second")

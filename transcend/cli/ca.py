"""Commands for certificates (NBD over TLS between sites)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from transcend.cli.common import (
    fail,
    main,
)


def _pki_dir(directory: Path | None) -> Path:
    from transcend.config import settings

    return directory if directory is not None else settings().pki_dir


def _pki_dir_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--dir", "directory", default=None, type=click.Path(file_okay=False, path_type=Path),
        help="CA directory  [default: $TRANSCEND_HOME/pki]")(fn)


@main.group()
def ca() -> None:
    """Certificates for NBD over TLS between sites: a small CA, one x509 bundle per
    site (qemu-nbd, nbdkit and libnbd read it as is), PSK files as the alternative."""


@ca.command("init")
@click.option("--name", default="transcend CA", show_default=True, help="the CA's common name")
@click.option("--days", default=3650, show_default=True, type=int, help="validity")
@click.option("--force", is_flag=True, help="replace an existing CA (every site must be re-issued)")
@_pki_dir_option
def ca_init(name: str, days: int, force: bool, directory: Path | None) -> None:
    """Create the CA (EC P-256 key, mode 0600) under DIR/ca."""
    from transcend.pki import CA_CERT, PkiError, ca_dir, init_ca

    d = _pki_dir(directory)
    try:
        cert = init_ca(d, name, days, force=force)
    except PkiError as e:
        fail(str(e))
        return
    click.echo(f"CA {cert.subject.rfc4514_string()} valid until "
               f"{cert.not_valid_after_utc:%Y-%m-%d}: {ca_dir(d) / CA_CERT}")


@ca.command("issue")
@click.argument("site")
@click.option("--host", "hosts", multiple=True, help="DNS name peers dial to reach the site (repeat)")
@click.option("--ip", "ips", multiple=True, help="IP address peers dial to reach the site (repeat)")
@click.option("--days", default=825, show_default=True, type=int, help="validity")
@click.option("--force", is_flag=True, help="replace the site's existing certificates")
@_pki_dir_option
def ca_issue(site: str, hosts: tuple[str, ...], ips: tuple[str, ...], days: int, force: bool,
             directory: Path | None) -> None:
    """Issue SITE's server and client certificates into DIR/sites/SITE."""
    from transcend.pki import PkiError, issue_site

    try:
        b = issue_site(_pki_dir(directory), site, hosts, ips, days, force=force)
    except PkiError as e:
        fail(str(e))
        return
    sans = ", ".join(f"{n}" for n in [*hosts, *ips])
    click.echo(f"site {site}: server certificate for {sans} and client certificate, valid until "
               f"{b.server_cert.not_valid_after_utc:%Y-%m-%d}"
               + (" (cut to the CA's expiry)" if b.clamped else ""))
    click.echo(f"copy {b.directory} to site {site} (keys are 0600) and use it as\n"
               f"  qemu-nbd --object tls-creds-x509,id=tls0,dir={b.directory},endpoint=server "
               "--tls-creds tls0 ...\n"
               f"  nbdkit --tls=require --tls-verify-peer --tls-certificates={b.directory} ...\n"
               f"  client URI: nbds://HOST:PORT/EXPORT?tls-certificates={b.directory}")


@ca.command("psk")
@click.argument("site")
@click.option("--identity", default=None, help="PSK identity (TLS user name)  [default: SITE]")
@click.option("--force", is_flag=True, help="replace the site's existing key")
@_pki_dir_option
def ca_psk(site: str, identity: str | None, force: bool, directory: Path | None) -> None:
    """Write a pre-shared key for SITE to DIR/sites/SITE/keys.psk (identity:hexkey, 0600)."""
    from transcend.pki import PSK_FILE, PkiError, psk_new, site_dir

    try:
        info = psk_new(site_dir(_pki_dir(directory), site) / PSK_FILE, identity or site, force=force)
    except PkiError as e:
        fail(str(e))
        return
    click.echo(f"PSK for identity {info.identity}: {info.path}\n"
               "give the same file to both sides and use it as\n"
               f"  qemu-nbd --object tls-creds-psk,id=tls0,dir={info.path.parent},endpoint=server "
               "--tls-creds tls0 ...\n"
               f"  nbdkit --tls=require --tls-psk={info.path} ...\n"
               f"  client URI: nbds://{info.identity}@HOST:PORT/EXPORT?tls-psk-file={info.path}")


@ca.command("list")
@_pki_dir_option
def ca_list(directory: Path | None) -> None:
    """The CA and each site's certificates: subject, SANs, expiry, chain to the CA."""
    from transcend.pki import PkiError, describe

    try:
        entries = describe(_pki_dir(directory))
    except PkiError as e:
        fail(str(e))
        return
    for c in entries:
        who = "CA" if c.role == "ca" else f"{c.site} {c.role}"
        state = "ok" if c.chains else ("EXPIRED" if c.expired else "BROKEN")
        sans = f" [{', '.join(c.sans)}]" if c.sans else ""
        click.echo(f"{who:24} {state:7} until {c.not_after:%Y-%m-%d}  {c.subject}{sans}")
        for p in c.problems:
            click.echo(f"{'':24} ! {p}")

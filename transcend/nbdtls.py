"""NBD over TLS between sites: which certificates this site presents, and how a URI
made by another activity (at another site) is opened here.

A staging export in a *push* transfer (docs/sites.md) is served by the target site's
qemu-nbd with that site's server certificate and ``verify-peer=on``; its URI in the
``StagingHandle`` is ``nbds://<site_address>:<port>/<export>`` without credentials,
because the certificate directory is a path on the host of whoever opens it. Every
process that opens such a URI adds its *own* site's client bundle with
:func:`with_local_credentials`; plain ``nbd+unix`` URIs pass through unchanged.

The site's bundle is ``Settings.site_tls_dir``: ``TRANSCEND_NBD_TLS_DIR`` or
``<pki_dir>/sites/<site>``, the layout ``transcend ca issue`` writes (transcend/pki.py).

With ``nbd_tls = "psk"`` the same directory holds ``keys.psk`` instead (``identity:
hexkey`` lines, ``transcend ca psk``): qemu-nbd serves with ``tls-creds-psk`` and
accepts every identity in it; a client presents this site's own identity when the
file has one, else the file's first (one shared line copied to every site works).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from connectors.base import PermanentError
from transcend import pki
from transcend.config import Settings

Role = Literal["server", "client"]

_FILES: dict[Role, tuple[str, ...]] = {
    "server": (pki.CA_CERT, pki.SERVER_CERT, pki.SERVER_KEY),
    "client": (pki.CA_CERT, pki.CLIENT_CERT, pki.CLIENT_KEY),
}
_PSK_FILES: tuple[str, ...] = (pki.PSK_FILE,)
# Query parameters carrying a reader's credentials: replaced by this site's own.
_CREDENTIAL_PARAMS = ("tls-certificates", "tls-psk-file", "tls-username")

# Words in libnbd/GnuTLS errors that mean the TLS session itself was refused (a
# certificate from another CA, none at all, a name mismatch, a server without TLS):
# retrying cannot fix those, unlike a cut link.
_TLS_REFUSAL = (
    "certificate", "verify failed", "requires tls", "handshake", "x509",
    "server does not support tls",
)
# When the *server* refuses our certificate, GnuTLS on our side only sees the session
# end ("The TLS connection was non-properly terminated"); during nbd_connect_uri that
# is the refusal (a link cut mid-copy fails a read or write command instead).
_AT_CONNECT = "nbd_connect"


class TlsSetupError(PermanentError):
    """This site's certificates are missing or unusable; the message says what to do."""


class TlsRefused(PermanentError):
    """The peer refused the TLS session (or we refused its certificate)."""


@dataclass(frozen=True)
class RemoteExport:
    """How a target site serves staging layers to writers at other sites."""

    address: str
    port_min: int
    port_max: int
    tls_dir: str
    psk: bool = False


def is_tls_uri(uri: str) -> bool:
    return urlsplit(uri).scheme.startswith("nbds")


def _issue_hint(settings: Settings, directory: Path) -> str:
    if settings.nbd_tls == "psk":
        return (f"run `transcend ca psk {settings.site}` (or copy the keys.psk the other "
                f"sites use) into {directory} on this site (or set TRANSCEND_NBD_TLS_DIR to "
                "where it is)")
    addr = settings.site_address or "ADDRESS"
    flag = "--host" if addr != "ADDRESS" and not _is_ip(addr) else "--ip"
    return (f"run `transcend ca issue {settings.site} {flag} {addr}` where the CA is (its "
            f"$TRANSCEND_HOME/pki) and copy the directory sites/{settings.site} to {directory} "
            f"on this site (or set TRANSCEND_NBD_TLS_DIR to where it is)")


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def site_credentials(settings: Settings, role: Role) -> Path:
    """This site's certificate directory, checked to hold the files ``role`` needs
    (qemu-nbd as server: ca-cert, server-cert, server-key; libnbd as client: ca-cert,
    client-cert, client-key; with PSK keys.psk for both). Raises TlsSetupError naming
    the missing file."""
    directory = settings.site_tls_dir
    files = _PSK_FILES if settings.nbd_tls == "psk" else _FILES[role]
    if not directory.is_dir():
        raise TlsSetupError(
            f"site {settings.site!r} has no NBD TLS certificates: {directory} does not "
            f"exist; {_issue_hint(settings, directory)}")
    missing = [n for n in files if not (directory / n).is_file()]
    if missing:
        raise TlsSetupError(
            f"site {settings.site!r}: {', '.join(missing)} missing in {directory} (needed "
            f"as NBD TLS {role}); {_issue_hint(settings, directory)}")
    unreadable = [n for n in files if not _readable(directory / n)]
    if unreadable:
        raise TlsSetupError(
            f"site {settings.site!r}: cannot read {', '.join(unreadable)} in {directory}; "
            "run the worker as the user that owns them")
    return directory


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False


def psk_identity(settings: Settings, psk_file: Path) -> str:
    """The identity this site presents from ``psk_file``: its own site name when the
    file has that line, else the first identity in it."""
    identities = []
    for line in psk_file.read_text(errors="replace").splitlines():
        ident, sep, key = line.strip().partition(":")
        if sep and ident and key:
            identities.append(ident)
    if not identities:
        raise TlsSetupError(f"site {settings.site!r}: {psk_file} holds no `identity:hexkey` "
                            f"line; {_issue_hint(settings, psk_file.parent)}")
    return settings.site if settings.site in identities else identities[0]


def with_local_credentials(uri: str, settings: Settings) -> str:
    """``uri`` with this site's client credentials (replacing any another site put
    there): its bundle as ``tls-certificates``, or with PSK its ``tls-psk-file`` and
    ``tls-username``; non-TLS URIs unchanged."""
    if not is_tls_uri(uri):
        return uri
    directory = site_credentials(settings, "client")
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in _CREDENTIAL_PARAMS]
    if settings.nbd_tls == "psk":
        psk_file = directory / pki.PSK_FILE
        query += [("tls-psk-file", str(psk_file)),
                  ("tls-username", psk_identity(settings, psk_file))]
    else:
        query.append(("tls-certificates", str(directory)))
    return urlunsplit(parts._replace(query=urlencode(query, safe="/", quote_via=quote)))


def remote_export(settings: Settings, transfer: str = "push") -> RemoteExport:
    """What a site needs to serve exports to other sites (the target of a push, the
    source of a pull transfer), checked: its address and its server certificates."""
    if not settings.site_address:
        direction = "to" if transfer == "push" else "from"
        raise TlsSetupError(
            f"this protection needs a {transfer} transfer {direction} site {settings.site!r}, "
            "but its worker has no site address: set TRANSCEND_SITE_ADDRESS (or site_address "
            "in transcend.toml) to the host name or IP the other site dials, and restart it")
    directory = site_credentials(settings, "server")
    return RemoteExport(address=settings.site_address, port_min=settings.nbd_port_min,
                        port_max=settings.nbd_port_max, tls_dir=str(directory),
                        psk=settings.nbd_tls == "psk")


def peer(uri: str) -> str:
    """``host:port`` of an NBD URI (for messages)."""
    parts = urlsplit(uri)
    return parts.netloc.rpartition("@")[2] or parts.path


def tls_refusal(uri: str, nbd_error: str, settings: Settings) -> TlsRefused | None:
    """A TlsRefused that names the peer and the certificate directory when
    ``nbd_error`` is a TLS refusal on the TLS URI ``uri``; None otherwise."""
    low = nbd_error.lower()
    refused = (any(w in low for w in _TLS_REFUSAL) or (_AT_CONNECT in low and "tls" in low)
               or (settings.nbd_tls == "psk" and "psk" in low))
    if not is_tls_uri(uri) or not refused:
        return None
    if settings.nbd_tls == "psk":
        return TlsRefused(
            f"NBD TLS (PSK) session with {peer(uri)} refused: {nbd_error.strip()}. Site "
            f"{settings.site!r} presented an identity from "
            f"{settings.site_tls_dir / pki.PSK_FILE}; the server's keys.psk must hold that "
            "identity with the same key, and both sites must use nbd_tls = psk")
    return TlsRefused(
        f"NBD TLS session with {peer(uri)} refused: {nbd_error.strip()}. Site "
        f"{settings.site!r} presented the client certificate in {settings.site_tls_dir}; "
        "both sites' bundles must come from the same CA (`transcend ca list` shows what each "
        "chains to) and the server certificate must name the address dialled "
        "(re-issue with `transcend ca issue SITE --ip ADDRESS --force`)")


__all__ = [
    "RemoteExport",
    "TlsRefused",
    "TlsSetupError",
    "is_tls_uri",
    "peer",
    "psk_identity",
    "remote_export",
    "site_credentials",
    "tls_refusal",
    "with_local_credentials",
]

"""A small certificate authority for NBD over TLS between sites.

Each site gets one directory that works unchanged for all three NBD programs::

    <dir>/ca/ca-cert.pem          the CA certificate (public)
    <dir>/ca/ca-key.pem           the CA key (0600; never leaves this machine)
    <dir>/sites/<site>/ca-cert.pem       copy of the CA certificate
    <dir>/sites/<site>/server-cert.pem   serverAuth; SANs = the site's names/addresses
    <dir>/sites/<site>/server-key.pem    0600
    <dir>/sites/<site>/client-cert.pem   clientAuth
    <dir>/sites/<site>/client-key.pem    0600
    <dir>/sites/<site>/keys.psk          optional PSK (``identity:hexkey``, 0600)

That is the layout of qemu's ``--object tls-creds-x509,dir=DIR,endpoint=server``
(ca-cert, server-cert, server-key) and ``endpoint=client`` (ca-cert, client-cert,
client-key), of nbdkit's ``--tls-certificates=DIR`` (ca-cert, server-cert,
server-key) and of libnbd's ``tls-certificates=DIR`` (ca-cert, client-cert,
client-key).  qemu's ``tls-creds-psk,dir=DIR`` reads ``DIR/keys.psk``; nbdkit's
``--tls-psk=FILE`` and libnbd's ``tls-psk-file=FILE`` read the same file.

Keys are EC P-256 (fast handshakes, small keys; GnuTLS, which qemu, nbdkit and
libnbd use, supports them everywhere).  A leaf's key usage is ``digitalSignature``
and is marked non-critical: the certificate sanity checks in qemu
(crypto/tlscredsx509.c) and libvirt have a rule refusing a *critical* key usage
without ``keyEncipherment``, which RFC 5480 forbids for EC keys (qemu-nbd 7.2
did not enforce it in practice; non-critical is safe either way).  Extended key usage
(serverAuth / clientAuth) is critical and enforced by GnuTLS.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "PSK_FILE",
    "SERVER_CERT",
    "SERVER_KEY",
    "CertInfo",
    "PkiError",
    "PskInfo",
    "SiteBundle",
    "ca_dir",
    "describe",
    "init_ca",
    "issue_site",
    "psk_new",
    "site_dir",
]

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
PSK_FILE = "keys.psk"

DEFAULT_CA_DAYS = 3650
DEFAULT_SITE_DAYS = 825
ORGANIZATION = "transcend"
# Certificates start a little in the past so that a peer whose clock lags does not
# see them as "not yet valid".
BACKDATE = timedelta(minutes=5)
# 32 bytes: what psktool generates by default (256-bit key).
PSK_BYTES = 32

_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_IDENTITY_RE = re.compile(r"^[^\s:]{1,128}$")
_HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


class PkiError(Exception):
    """Something about the CA or a site's files is wrong; the message says what to do."""


@dataclass(frozen=True)
class SiteBundle:
    """What ``issue_site`` wrote."""

    site: str
    directory: Path
    server_cert: x509.Certificate
    client_cert: x509.Certificate
    clamped: bool = False  # not-after was cut to the CA's


@dataclass(frozen=True)
class PskInfo:
    path: Path
    identity: str


@dataclass(frozen=True)
class CertInfo:
    """One certificate as ``describe`` sees it."""

    role: str  # "ca", "server" or "client"
    site: str | None
    path: Path
    subject: str
    sans: list[str]
    not_after: datetime
    serial: int
    chains: bool  # signed by the CA in <dir>/ca and valid now
    problems: list[str] = field(default_factory=list)

    @property
    def expired(self) -> bool:
        return self.not_after <= datetime.now(UTC)


# ---------------------------------------------------------------- paths and files


def ca_dir(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / "ca"


def site_dir(directory: str | os.PathLike[str], site: str) -> Path:
    _check_site(site)
    return Path(directory) / "sites" / site


def _check_site(site: str) -> None:
    if not _SITE_RE.match(site):
        raise PkiError(
            f"site name {site!r} is not usable as a directory name: use letters, digits, "
            "'.', '_' and '-' (at most 63 characters, not starting with '.', '_' or '-')")


def _mkdir(path: Path, mode: int) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as e:
        raise PkiError(f"cannot create {path}: {e.strerror or e}; choose another --dir "
                       "or fix the permissions of its parent") from e


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically (temporary file + rename) with ``mode`` from the
    start, so a key is never readable by others, not even for a moment."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise PkiError(f"cannot write in {path.parent}: {e.strerror or e}") from e
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise PkiError(f"cannot write {path}: {e.strerror or e}") from e


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise PkiError(f"{what} {path} is missing") from e
    except PermissionError as e:
        raise PkiError(f"cannot read {what} {path}: permission denied; run as the user that "
                       "owns it (or with sudo)") from e
    except OSError as e:
        raise PkiError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _key_mode_problem(path: Path) -> str | None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return (f"{path} has mode {mode:04o}, readable by others: run `chmod 600 {path}`")
    return None


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(path: Path, what: str) -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise PkiError(f"{what} {path} is not a PEM certificate ({e})") from e


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    d = ca_dir(directory)
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    if not cert_path.exists() and not key_path.exists():
        raise PkiError(f"no CA in {directory}: run `transcend ca init` first "
                       "(or pass the --dir that holds it)")
    cert = _load_cert(cert_path, "CA certificate")
    problem = _key_mode_problem(key_path)
    if problem:
        raise PkiError(f"CA key {problem}")
    data = _read(key_path, "CA key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"CA key {key_path} cannot be loaded ({e}); restore it from a backup "
                       "or make a new CA with `transcend ca init --force` (and re-issue every "
                       "site)") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"CA key {key_path} is not an EC key")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise PkiError(f"CA key {key_path} does not belong to {cert_path}; restore the "
                       "matching pair or make a new CA with `transcend ca init --force`")
    return cert, key


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return b""
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


# ---------------------------------------------------------------- CA


def init_ca(directory: str | os.PathLike[str], name: str = "transcend CA",
            days: int = DEFAULT_CA_DAYS, *, force: bool = False) -> x509.Certificate:
    """Create the CA in ``<directory>/ca``: an EC P-256 key (0600) and a
    self-signed certificate valid for ``days``.  An existing CA is kept unless
    ``force`` (then every site must be re-issued: old site certificates no longer
    chain to the new CA)."""
    directory = Path(directory)
    if days < 1:
        raise PkiError(f"--days must be at least 1 (got {days})")
    if not name.strip():
        raise PkiError("the CA name must not be empty")
    d = ca_dir(directory)
    if not force and ((d / CA_CERT).exists() or (d / CA_KEY).exists()):
        raise PkiError(f"a CA already exists in {d}; keep it, or replace it with --force "
                       "(every site must then be re-issued with `transcend ca issue --force`)")
    _mkdir(d, 0o700)
    key = _new_key()
    now = _now()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(_ski(key), critical=False)
        .sign(key, hashes.SHA256())
    )
    # key first: a certificate without its key would look like a usable CA
    _write(d / CA_KEY, _private_pem(key), 0o600)
    _write(d / CA_CERT, _cert_pem(cert), 0o644)
    return cert


# ---------------------------------------------------------------- sites


def _parse_ips(ips: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for ip in ips:
        try:
            out.append(ipaddress.ip_address(ip))
        except ValueError as e:
            raise PkiError(f"--ip {ip!r} is not an IPv4 or IPv6 address") from e
    return out


def _check_hosts(hostnames: Sequence[str]) -> list[str]:
    out = []
    for h in hostnames:
        try:
            ipaddress.ip_address(h)
        except ValueError:
            pass
        else:
            raise PkiError(f"--host {h!r} is an IP address: pass it with --ip")
        if not _HOST_RE.match(h) or len(h) > 253:
            raise PkiError(f"--host {h!r} is not a DNS name")
        out.append(h.rstrip(".").lower())
    return out


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          key: ec.EllipticCurvePrivateKey, subject: x509.Name, not_after: datetime,
          purpose: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> x509.Certificate:
    now = _now()
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # non-critical: see the module docstring (qemu vs. RFC 5480)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=False)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=True)
        .add_extension(_ski(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def issue_site(directory: str | os.PathLike[str], site: str, hostnames: Sequence[str] = (),
               ips: Sequence[str] = (), days: int = DEFAULT_SITE_DAYS, *,
               force: bool = False) -> SiteBundle:
    """Issue ``site``'s server certificate (serverAuth; SANs: ``hostnames`` and
    ``ips``, the names and addresses peers dial) and client certificate
    (clientAuth) into ``<directory>/sites/<site>/`` together with a copy of the
    CA certificate.  A site that already has certificates is left alone unless
    ``force``.  The certificates never outlive the CA (``clamped`` says so)."""
    directory = Path(directory)
    _check_site(site)
    if days < 1:
        raise PkiError(f"--days must be at least 1 (got {days})")
    hosts = _check_hosts(hostnames)
    addrs = _parse_ips(ips)
    if not hosts and not addrs:
        raise PkiError(f"give the names peers use to reach site {site!r}: at least one "
                       "--host NAME or --ip ADDR (clients check the server certificate "
                       "against the host in the NBD URI)")
    ca_cert, ca_key = _load_ca(directory)
    d = site_dir(directory, site)
    existing = [d / n for n in (SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY) if (d / n).exists()]
    if existing and not force:
        raise PkiError(f"site {site!r} already has certificates in {d}; use --force to "
                       "replace them (peers keep working: the CA is the same)")
    now = _now()
    not_after = now + timedelta(days=days)
    ca_end = ca_cert.not_valid_after_utc
    if ca_end <= now:
        raise PkiError(f"the CA certificate expired on {ca_end:%Y-%m-%d}; make a new CA with "
                       "`transcend ca init --force` and re-issue every site")
    clamped = not_after > ca_end
    not_after = min(not_after, ca_end)
    _mkdir(d, 0o700)

    def name(role: str, cn: str) -> x509.Name:
        return x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"site {site} {role}"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ])

    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    sans += [x509.IPAddress(a) for a in addrs]
    server_key, client_key = _new_key(), _new_key()
    server = _leaf(ca_cert, ca_key, server_key, name("server", hosts[0] if hosts else str(addrs[0])),
                   not_after, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client = _leaf(ca_cert, ca_key, client_key, name("client", site), not_after,
                   ExtendedKeyUsageOID.CLIENT_AUTH, [])
    # keys before certificates, so a reader never pairs a new certificate with an old key
    _write(d / SERVER_KEY, _private_pem(server_key), 0o600)
    _write(d / CLIENT_KEY, _private_pem(client_key), 0o600)
    _write(d / SERVER_CERT, _cert_pem(server), 0o644)
    _write(d / CLIENT_CERT, _cert_pem(client), 0o644)
    _write(d / CA_CERT, _cert_pem(ca_cert), 0o644)
    return SiteBundle(site=site, directory=d, server_cert=server, client_cert=client,
                      clamped=clamped)


# ---------------------------------------------------------------- PSK


def psk_new(path: str | os.PathLike[str], identity: str, *, force: bool = False) -> PskInfo:
    """Write a pre-shared key file ``identity:hexkey`` (one line, 256-bit key, 0600):
    the psktool format that qemu (``tls-creds-psk,dir=`` reads ``keys.psk``), nbdkit
    (``--tls-psk=FILE``) and libnbd (``tls-psk-file=FILE``, user = identity) read.
    An existing file is kept unless ``force``."""
    path = Path(path)
    if not _IDENTITY_RE.match(identity):
        raise PkiError(f"PSK identity {identity!r} must be 1-128 characters without ':' or "
                       "whitespace")
    if path.exists() and not force:
        raise PkiError(f"{path} already exists; use --force to replace it (both sites must "
                       "then get the new file)")
    _mkdir(path.parent, 0o700)
    _write(path, f"{identity}:{secrets.token_hex(PSK_BYTES)}\n".encode(), 0o600)
    return PskInfo(path=path, identity=identity)


# ---------------------------------------------------------------- listing


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)] + [
        f"IP:{a}" for a in ext.get_values_for_type(x509.IPAddress)]


def _chains(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    now = datetime.now(UTC)
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def _info(role: str, site: str | None, path: Path, cert: x509.Certificate,
          ca: x509.Certificate | None, problems: list[str]) -> CertInfo:
    chains = ca is not None and _chains(cert, ca)
    if ca is not None and not chains:
        if cert.not_valid_after_utc <= datetime.now(UTC):
            problems.append(f"expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        else:
            problems.append("not signed by this CA: re-issue with `transcend ca issue --force`")
    return CertInfo(role=role, site=site, path=path, subject=cert.subject.rfc4514_string(),
                    sans=_sans(cert), not_after=cert.not_valid_after_utc,
                    serial=cert.serial_number, chains=chains, problems=problems)


def describe(directory: str | os.PathLike[str]) -> list[CertInfo]:
    """The CA and every site's certificates: subject, SANs, not-after, whether each
    chains to the CA, and what is wrong (key permissions, a stale CA copy, expiry)."""
    directory = Path(directory)
    d = ca_dir(directory)
    if not (d / CA_CERT).exists():
        raise PkiError(f"no CA in {directory}: run `transcend ca init` first "
                       "(or pass the --dir that holds it)")
    ca = _load_cert(d / CA_CERT, "CA certificate")
    ca_problems = []
    if not (d / CA_KEY).exists():
        ca_problems.append(f"CA key {d / CA_KEY} is missing: sites cannot be issued")
    elif p := _key_mode_problem(d / CA_KEY):
        ca_problems.append(p)
    out = [_info("ca", None, d / CA_CERT, ca, ca, ca_problems)]
    sites = directory / "sites"
    for sd in sorted(sites.iterdir()) if sites.is_dir() else []:
        if not sd.is_dir():
            continue
        copy_problem = []
        try:
            if _load_cert(sd / CA_CERT, "CA certificate copy") != ca:
                copy_problem.append(f"{sd / CA_CERT} is not this CA's certificate: re-issue "
                                    "the site with `transcend ca issue --force`")
        except PkiError as e:
            copy_problem.append(str(e))
        site_entries: list[CertInfo] = []
        for role, cert_name, key_name in (("server", SERVER_CERT, SERVER_KEY),
                                          ("client", CLIENT_CERT, CLIENT_KEY)):
            if not (sd / cert_name).exists():
                continue
            problems = [] if site_entries else list(copy_problem)  # once per site
            if not (sd / key_name).exists():
                problems.append(f"{sd / key_name} is missing")
            elif p := _key_mode_problem(sd / key_name):
                problems.append(p)
            try:
                cert = _load_cert(sd / cert_name, f"{role} certificate")
            except PkiError as e:
                site_entries.append(CertInfo(
                    role=role, site=sd.name, path=sd / cert_name, subject="?", sans=[],
                    not_after=datetime.min.replace(tzinfo=UTC), serial=0, chains=False,
                    problems=[*problems, str(e)]))
                continue
            site_entries.append(_info(role, sd.name, sd / cert_name, cert, ca, problems))
        if site_entries and (sd / PSK_FILE).exists() and (p := _key_mode_problem(sd / PSK_FILE)):
            site_entries[0].problems.append(p)  # once per site
        out += site_entries
    return out

"""transcend/pki.py and `transcend ca`: a CA, per-site certificates and PSK files,
proven against real NBD servers (qemu-nbd, nbdkit) with blockstream and libnbd
as the client.

Two sites: site B serves an export (server side of its bundle), site A dials it
(client side of its bundle).  Both bundles come from one CA; a third bundle from
another CA plays the stranger.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from harness.nbd import NbdServer, TlsPsk, TlsX509, nbdkit, qemu_nbd

from blockstream import BlockstreamError, Extent, block_status, copy, plan_extents
from transcend import pki
from transcend.cli import main

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB
BS = 65536
DISK = 4 * MiB + 3 * BS  # data, a hole, data


def _site(base: Path, site: str) -> Path:
    return base / "sites" / site


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pki-good")
    pki.init_ca(base, "transcend test CA", days=30)
    pki.issue_site(base, "site-b", ["localhost"], ["127.0.0.1", "::1"], days=10)
    pki.issue_site(base, "site-a", ["dr-a.example"], ["192.0.2.10"], days=10)
    return base


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pki-other")
    pki.init_ca(base, "some other CA", days=30)
    pki.issue_site(base, "site-a", ["dr-a.example"], days=10)
    return base


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("pki-img") / "disk.raw"
    rnd = random.Random(5)
    content = bytearray(DISK)
    content[: 2 * MiB] = rnd.randbytes(2 * MiB)
    content[3 * MiB :] = rnd.randbytes(DISK - 3 * MiB)
    with open(path, "wb") as f:
        f.truncate(DISK)
        os.pwrite(f.fileno(), bytes(content[: 2 * MiB]), 0)
        os.pwrite(f.fileno(), bytes(content[3 * MiB :]), 3 * MiB)
    return path, bytes(content)


def _creds(good: Path) -> TlsX509:
    """Site B serves, site A dials: each side uses its own site's directory as is."""
    return TlsX509(server_dir=_site(good, "site-b"), client_dir=_site(good, "site-a"))


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _copy_all(src_uri: str, dst_uri: str) -> None:
    extents = plan_extents(block_status(src_uri), None, disk_size=DISK, granularity=BS)
    p = copy(src_uri, dst_uri, extents, disk_size=DISK)
    assert p.done


def _refused(uri: str) -> BlockstreamError:
    with pytest.raises(BlockstreamError) as ei:
        copy(uri, None, [Extent(0, BS)], disk_size=DISK)
    return ei.value


def _server_log(s: NbdServer, needle: str) -> str:
    """The server writes its side of a refusal a moment after the client gives up."""
    deadline = time.monotonic() + 5
    while needle not in (log := s.log_tail(200)).lower() and time.monotonic() < deadline:
        time.sleep(0.05)
    return log.lower()


# ---------------------------------------------------------------- files


def test_layout_permissions_and_certificates(good: Path) -> None:
    ca_dir = good / "ca"
    assert _mode(ca_dir / "ca-key.pem") == 0o600
    assert _mode(ca_dir) == 0o700
    ca = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    site = _site(good, "site-b")
    assert sorted(p.name for p in site.iterdir()) == [
        "ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"]
    for key in ("server-key.pem", "client-key.pem"):
        assert _mode(site / key) == 0o600
    assert (site / "ca-cert.pem").read_bytes() == (ca_dir / "ca-cert.pem").read_bytes()

    server = x509.load_pem_x509_certificate((site / "server-cert.pem").read_bytes())
    client = x509.load_pem_x509_certificate((site / "client-cert.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # expiry as asked, starting slightly in the past; serials random and distinct
    now = datetime.now(UTC)
    assert abs(server.not_valid_after_utc - (now + timedelta(days=10))) < timedelta(minutes=5)
    assert now - timedelta(minutes=10) < server.not_valid_before_utc < now
    serials = {ca.serial_number, server.serial_number, client.serial_number}
    assert len(serials) == 3 and all(s > 2**64 for s in serials)


def test_site_certificates_never_outlive_the_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, days=5)
    b = pki.issue_site(tmp_path, "s", ["s.example"], days=400)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca-cert.pem").read_bytes())
    assert b.clamped and b.server_cert.not_valid_after_utc == ca.not_valid_after_utc


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError, match=r"already exists.*--force"):
        pki.init_ca(tmp_path)
    b1 = pki.issue_site(tmp_path, "s", ["s.example"])
    key_before = (_site(tmp_path, "s") / "server-key.pem").read_bytes()
    with pytest.raises(pki.PkiError, match=r"already has certificates.*--force"):
        pki.issue_site(tmp_path, "s", ["s.example"])
    assert (_site(tmp_path, "s") / "server-key.pem").read_bytes() == key_before
    b2 = pki.issue_site(tmp_path, "s", ["s.example", "t.example"], force=True)
    assert b2.server_cert.serial_number != b1.server_cert.serial_number
    assert (_site(tmp_path, "s") / "server-key.pem").read_bytes() != key_before
    assert _mode(_site(tmp_path, "s") / "server-key.pem") == 0o600

    psk = _site(tmp_path, "s") / "keys.psk"
    pki.psk_new(psk, "s")
    text = psk.read_text()
    with pytest.raises(pki.PkiError, match=r"already exists.*--force"):
        pki.psk_new(psk, "s")
    assert psk.read_text() == text
    pki.psk_new(psk, "s", force=True)
    assert psk.read_text() != text

    # a new CA with --force: the old site no longer chains, and `describe` says so
    second = pki.init_ca(tmp_path, "replacement", force=True)
    assert second.serial_number != first.serial_number
    entries = {(c.site, c.role): c for c in pki.describe(tmp_path)}
    assert entries[(None, "ca")].chains
    assert not entries[("s", "server")].chains
    assert any("not signed by this CA" in p for p in entries[("s", "server")].problems)


def test_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match=r"run `transcend ca init` first"):
        pki.issue_site(tmp_path, "s", ["s.example"])
    with pytest.raises(pki.PkiError, match=r"run `transcend ca init` first"):
        pki.describe(tmp_path)
    pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="at least one --host NAME or --ip ADDR"):
        pki.issue_site(tmp_path, "s")
    with pytest.raises(pki.PkiError, match="pass it with --ip"):
        pki.issue_site(tmp_path, "s", ["10.0.0.1"])
    with pytest.raises(pki.PkiError, match="not an IPv4 or IPv6 address"):
        pki.issue_site(tmp_path, "s", ips=["dr.example"])
    with pytest.raises(pki.PkiError, match="directory name"):
        pki.issue_site(tmp_path, "../escape", ["s.example"])
    with pytest.raises(pki.PkiError, match="without ':'"):
        pki.psk_new(tmp_path / "k.psk", "a:b")

    key = tmp_path / "ca" / "ca-key.pem"
    key.chmod(0o644)
    with pytest.raises(pki.PkiError, match=r"mode 0644, readable by others: run `chmod 600"):
        pki.issue_site(tmp_path, "s", ["s.example"])
    key.chmod(0o600)
    saved = key.read_bytes()
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(pki.PkiError, match="cannot be loaded"):
        pki.issue_site(tmp_path, "s", ["s.example"])
    key.write_bytes(saved)
    real_read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == key:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    with pytest.MonkeyPatch.context() as mp:  # root reads anything: simulate another owner
        mp.setattr(Path, "read_bytes", denied)
        with pytest.raises(pki.PkiError, match=r"cannot read CA key .*permission denied; run as"):
            pki.issue_site(tmp_path, "s", ["s.example"])
    pki.issue_site(tmp_path, "s", ["s.example"])
    (_site(tmp_path, "s") / "client-key.pem").chmod(0o640)
    problems = [p for c in pki.describe(tmp_path) for p in c.problems]
    assert any("client-key.pem has mode 0640" in p for p in problems)


# ---------------------------------------------------------------- x509 with real servers


def test_qemu_nbd_x509_copy_between_sites(good: Path, image: tuple[Path, bytes], tmp_path: Path) -> None:
    path, content = image
    dst = tmp_path / "dst.raw"
    dst.write_bytes(b"")
    os.truncate(dst, DISK)
    creds = _creds(good)
    with (
        qemu_nbd(path, fmt="raw", read_only=True, tcp=True, tls=creds) as s,
        qemu_nbd(dst, fmt="raw", tcp=True, tls=creds) as d,
    ):
        assert s.uri.startswith("nbds://localhost:") and "tls-certificates=" in s.uri
        _copy_all(s.uri, d.uri)
        # the server certificate also names 127.0.0.1: dialing the address works too
        _copy_all(s.uri.replace("//localhost:", "//127.0.0.1:"), d.uri)
        # QEMU's own NBD client reads the same site directory (endpoint=client)
        r = subprocess.run(
            ["qemu-img", "compare", "--object",
             f"tls-creds-x509,id=tls0,dir={_site(good, 'site-a')},endpoint=client",
             "--image-opts", f"driver=raw,file.driver=file,file.filename={path}",
             f"driver=nbd,server.type=inet,server.host=localhost,server.port={s.port},"
             "tls-creds=tls0"],
            capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
    assert dst.read_bytes() == content


def test_qemu_nbd_refuses_strangers(good: Path, other: Path, image: tuple[Path, bytes],
                                    tmp_path: Path) -> None:
    path, _ = image
    creds = _creds(good)
    # a client that trusts site B's CA but holds a certificate of another CA
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(_site(good, "site-a") / "ca-cert.pem", mixed)
    for f in ("client-cert.pem", "client-key.pem"):
        shutil.copy(_site(other, "site-a") / f, mixed)
    # a client with no certificate at all
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(_site(good, "site-a") / "ca-cert.pem", bare)
    with qemu_nbd(path, fmt="raw", read_only=True, tcp=True, tls=creds) as s:
        for client in (mixed, bare):
            e = _refused(s.uri_with(TlsX509(server_dir=client, client_dir=client)))
            assert e.endpoint == "source"
            assert "TLS" in e.nbd_error
            assert "verify failed: no certificate was found" in _server_log(s, "no certificate")
        # the stranger's whole bundle: it does not trust site B's server certificate either
        e = _refused(s.uri_with(TlsX509(server_dir=other, client_dir=_site(other, "site-a"))))
        assert "certificate verification" in e.nbd_error
        # plain NBD to a TLS-only server
        e = _refused(s.uri_with(None))
        assert "requires TLS" in e.nbd_error


def test_server_certificate_must_name_the_host(good: Path, image: tuple[Path, bytes]) -> None:
    pki.issue_site(good, "site-c", ["elsewhere.example"], ["192.0.2.77"])
    try:
        creds = TlsX509(server_dir=_site(good, "site-c"), client_dir=_site(good, "site-a"))
        with qemu_nbd(image[0], fmt="raw", read_only=True, tcp=True, tls=creds) as s:
            e = _refused(s.uri)  # dials localhost, the certificate names elsewhere.example
            assert "certificate verification" in e.nbd_error
    finally:
        shutil.rmtree(_site(good, "site-c"))


def test_nbdkit_x509_with_peer_verification(good: Path, other: Path, image: tuple[Path, bytes],
                                            tmp_path: Path) -> None:
    path, content = image
    creds = _creds(good)
    with (
        qemu_nbd(path, fmt="raw", read_only=True, tcp=True, tls=creds) as s,
        nbdkit("memory", f"size={DISK}", tcp=True, tls=creds, extra=["--tls-verify-peer"]) as d,
    ):
        _copy_all(s.uri, d.uri)
        # nbdcopy (libnbd) reads it back with site A's directory
        back = subprocess.run(["nbdcopy", "--", d.uri, "-"], capture_output=True, check=True,
                              timeout=30).stdout
        assert back == content
        e = _refused(d.uri_with(TlsX509(server_dir=other, client_dir=_site(other, "site-a"))))
        assert "certificate" in e.nbd_error.lower()
        # site A's CA but no client certificate: nbdkit --tls-verify-peer refuses; the
        # client sees the TLS session torn down (as a gnutls error or, when the server's
        # close wins the race, as the socket closed), the server log says why
        bare = tmp_path / "bare"
        bare.mkdir()
        shutil.copy(_site(good, "site-a") / "ca-cert.pem", bare)
        r = subprocess.run(["nbdcopy", "--", d.uri_with(TlsX509(bare, bare)), "null:"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, r
        assert "gnutls" in r.stderr or "server closed socket unexpectedly" in r.stderr, r.stderr
        assert "error in the certificate" in _server_log(d, "error in the certificate")


# ---------------------------------------------------------------- PSK with real servers


def test_psk_nbdkit_qemu_and_libnbd(good: Path, image: tuple[Path, bytes], tmp_path: Path) -> None:
    path, content = image
    psk_path = _site(good, "site-b") / "keys.psk"
    info = pki.psk_new(psk_path, "site-b")
    try:
        assert _mode(psk_path) == 0o600
        identity, _, hexkey = psk_path.read_text().strip().partition(":")
        assert identity == "site-b" and len(bytes.fromhex(hexkey)) == 32
        psk = TlsPsk(psk_file=info.path, username=info.identity)
        dst = tmp_path / "dst.raw"
        dst.write_bytes(b"")
        os.truncate(dst, DISK)
        # qemu's tls-creds-psk reads DIR/keys.psk: the site directory as is
        with (
            qemu_nbd(path, fmt="raw", read_only=True, tcp=True, tls=psk) as s,
            nbdkit("file", str(dst), tcp=True, tls=psk) as d,
        ):
            assert s.uri.startswith("nbds://site-b@localhost:") and "tls-psk-file=" in s.uri
            _copy_all(s.uri, d.uri)
            wrong_file = tmp_path / "wrong" / "keys.psk"
            pki.psk_new(wrong_file, "site-b")
            wrong = TlsPsk(psk_file=wrong_file, username="site-b")
            for srv in (s, d):
                e = _refused(srv.uri_with(wrong))
                assert "TLS" in e.nbd_error
            e = _refused(d.uri_with(None))
            assert "requires TLS" in e.nbd_error
        assert dst.read_bytes() == content
    finally:
        psk_path.unlink(missing_ok=True)


# ---------------------------------------------------------------- CLI


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path / "pki")
    code, _, err = _cli("ca", "list", "--dir", d)
    assert code == 2 and "run `transcend ca init` first" in err
    code, out, _ = _cli("ca", "init", "--dir", d, "--name", "DR CA", "--days", "100")
    assert code == 0 and "CN=DR CA" in out
    code, _, err = _cli("ca", "init", "--dir", d)
    assert code == 2 and "--force" in err
    code, out, _ = _cli("ca", "issue", "site-b", "--host", "dr-b.example", "--ip", "198.51.100.7",
                        "--ip", "2001:db8::7", "--dir", d)
    assert code == 0, out
    assert "tls-creds-x509" in out and "tls-certificates=" in out
    code, _, err = _cli("ca", "issue", "site-b", "--host", "dr-b.example", "--dir", d)
    assert code == 2 and "--force" in err
    code, out, _ = _cli("ca", "issue", "site-b", "--host", "dr-b.example", "--force", "--dir", d)
    assert code == 0
    code, out, _ = _cli("ca", "psk", "site-b", "--identity", "link-ab", "--dir", d)
    assert code == 0 and "nbds://link-ab@" in out
    assert (tmp_path / "pki/sites/site-b/keys.psk").read_text().startswith("link-ab:")
    code, out, _ = _cli("ca", "list", "--dir", d)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("CA") and " ok " in lines[0]
    server = next(ln for ln in lines if ln.startswith("site-b server"))
    assert " ok " in server and "DNS:dr-b.example" in server
    assert next(ln for ln in lines if ln.startswith("site-b client"))

    # the default directory is $TRANSCEND_HOME/pki
    from transcend.config import settings

    monkeypatch.setenv("TRANSCEND_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRANSCEND_CONFIG", raising=False)
    settings.cache_clear()
    try:
        code, out, _ = _cli("ca", "init")
        assert code == 0 and str(tmp_path / "home" / "pki" / "ca" / "ca-cert.pem") in out
        code, out, _ = _cli("ca", "issue", "site-a", "--ip", "192.0.2.1")
        assert code == 0 and (tmp_path / "home/pki/sites/site-a/server-cert.pem").exists()
        code, out, _ = _cli("ca", "list")
        assert code == 0 and "site-a server" in out and "IP:192.0.2.1" in out
    finally:
        settings.cache_clear()

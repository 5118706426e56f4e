"""Commands for the Temporal side: the embedded dev server with its UI, the codec server
that lets the UI show decoded payloads, and the saved views (visibility queries)."""

from __future__ import annotations

import ipaddress
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import click

from transcend.cli import common
from transcend.cli.common import _catalog, fail, main, run_async


def _stop_on_sigterm() -> None:
    """SIGTERM ends the command like Ctrl-C does, so its ``finally`` stops what it started
    (the dev server runs in its own session and would outlive a plain exit)."""
    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@main.command()
@click.option("--port", default=7233, show_default=True)
@click.option("--ui-port", default=8233, show_default=True)
@click.option("--codec-port", default=0, help="the UI's codec server (default: UI port + 1)")
@click.option("--codec/--no-codec", default=True, show_default=True,
              help="start the codec server so the UI shows decoded payloads")
def server(port: int, ui_port: int, codec_port: int, codec: bool) -> None:
    """Run the embedded Temporal dev server (SQLite file under $TRANSCEND_HOME), its UI
    and the codec server the UI decodes payloads with; all on 127.0.0.1."""
    from temporal.devserver import start_dev_server
    from transcend.codec_server import embedded_for_ui
    from transcend.config import settings

    s = settings()
    _stop_on_sigterm()
    codec_srv = None
    endpoint = ""
    if codec:
        try:
            codec_srv, endpoint = embedded_for_ui(s, ui_port, codec_port or ui_port + 1)
        except OSError as e:
            fail(f"the codec server cannot listen on 127.0.0.1:{codec_port or ui_port + 1} ({e}); "
                 "choose another --codec-port or --no-codec")
            return
    try:
        dev = start_dev_server(s.home / "temporal.db", port=port, ui_port=ui_port,
                               codec_endpoint=endpoint)
    except RuntimeError as e:
        if codec_srv is not None:
            codec_srv.stop()
        fail(str(e))
        return
    click.echo(f"Temporal dev server on {dev.address}; UI {dev.ui_url}"
               + (f" (payloads decoded by the codec server on {codec_srv.url})" if codec_srv else ""))
    try:
        dev.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        dev.stop()
        if codec_srv is not None:
            codec_srv.stop()


@main.command("codec-server")
@click.option("--listen", default="127.0.0.1:8081", show_default=True, metavar="HOST:PORT")
@click.option("--ui-origin", "ui_origins", multiple=True, metavar="URL",
              help="the Temporal UI's origin, e.g. https://temporal.example.com (repeat); "
                   "browsers on other origins are refused  [default: http://127.0.0.1:8233, "
                   "http://localhost:8233]")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="bearer tokens, one per line (default: $TRANSCEND_HOME/keys/"
                   "codec-server.tokens, created with a random one)")
@click.option("--tls-cert", default="", help="serve HTTPS with this certificate (PEM)")
@click.option("--tls-key", default="", help="its private key (PEM)")
@click.option("--client-ca", default="",
              help="require client certificates signed by this CA (mTLS): the certificate is "
                   "then the authentication, no token needed")
def codec_server(listen: str, ui_origins: tuple[str, ...], token_file: Path | None,
                 tls_cert: str, tls_key: str, client_ca: str) -> None:
    """Serve Temporal's remote codec protocol (/decode, /encode) over the workers' payload
    keys, for the Temporal UI (its codec endpoint setting) and `temporal --codec-endpoint`."""
    from transcend.codec_server import codec_server_for, tls_context
    from transcend.config import settings

    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        fail(f"--listen {listen!r} is not HOST:PORT (e.g. 127.0.0.1:8081)")
        return
    if bool(tls_cert) != bool(tls_key) or (client_ca and not tls_cert):
        fail("--tls-cert and --tls-key go together, and --client-ca needs them")
        return
    ctx = tls_context(tls_cert, tls_key, client_ca) if tls_cert else None
    if ctx is None and not _loopback(host):
        click.echo(f"warning: serving plain HTTP on {host}: tokens and decoded payloads cross "
                   "the network in clear; use --tls-cert/--tls-key or a TLS proxy", err=True)
    origins = list(ui_origins) or ["http://127.0.0.1:8233", "http://localhost:8233"]
    s = settings()
    try:
        srv, _ = codec_server_for(s, host, int(port_text), origins, tokens_path=token_file,
                                  ssl_context=ctx, mtls=bool(client_ca))
    except (OSError, ValueError) as e:
        fail(f"codec server not started: {e}")
        return
    _stop_on_sigterm()
    auth = "client certificates" if client_ca else f"bearer tokens from {token_file or 'the token file'}"
    click.echo(f"codec server on {srv.url} for namespace {s.temporal_namespace!r}; "
               f"UI origins {', '.join(origins)}; authentication: {auth}")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


@main.command()
@click.option("--ui", "ui_url", default="http://127.0.0.1:8233", show_default=True,
              help="the Temporal UI the links open")
@click.option("--count/--no-count", default=False, show_default=True,
              help="also ask Temporal how many workflows each view matches now")
@run_async
async def views(ui_url: str, count: bool) -> None:
    """The questions operators ask, as Temporal visibility queries and UI links."""
    from transcend.config import settings
    from transcend.views import views as make_views

    rpos = [rec.spec.policy.rpo_seconds for rec in _catalog().list_protections()]
    found = make_views(datetime.now(UTC), rpos)
    client = await common._client() if count else None
    ns = settings().temporal_namespace
    for v in found:
        matched = ""
        if client is not None:
            matched = f"  [{(await client.count_workflows(v.query)).count} now]"
        click.echo(f"{v.name}: {v.question}{matched}\n  query: {v.query}\n  {v.url(ui_url, ns)}")
    sys.stdout.flush()

"""Temporal's remote codec protocol, so the Temporal UI (and ``temporal --codec-endpoint``)
show decoded workflow inputs, results, signals and query answers (issue #23).

The protocol (temporalio/samples-go codec-server/protocol.md): ``POST .../decode`` and
``POST .../encode`` with a ``temporal.api.common.v1.Payloads`` message as protobuf JSON;
only the last path segment names the operation, so the endpoints may sit under any
prefix. Browsers call it cross-origin from the UI, so CORS preflight is answered, but
only for the configured UI origins.

Security model (docs/operations.md "The codec server"): the server holds the payload
keys, so it decodes only for a caller that proves one of

- a bearer token (``Authorization: Bearer <token>``, what ``temporal --codec-auth`` and
  the UI's "pass access token" send) that is in the token file;
- the token as the path segment before the operation (``/<token>/decode``): the form the
  embedded dev UI uses, since it has no login to take a token from: whoever can open
  that UI can decode, so both listen on 127.0.0.1 only;
- a client certificate signed by the configured CA (mTLS), e.g. from the operator's SSO
  proxy in front of the UI in a cluster.

A browser request from an origin that is not allowed is refused even with a valid token:
another page open in the operator's browser must not be able to use the codec.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads
from temporalio.converter import PayloadCodec

from transcend.codec import CodecKeyError
from transcend.config import Settings

log = logging.getLogger(__name__)

#: Bigger bodies are refused (413): the UI decodes one event's payloads at a time, and
#: transcend's payloads are small models (the largest, a status with its cycles, is KiBs).
MAX_BODY = 4 << 20
#: Request headers a browser may send (the UI sends Content-Type, X-Namespace and, with
#: "pass access token", Authorization).
ALLOWED_HEADERS = ("Content-Type", "X-Namespace", "Authorization")
OPERATIONS = ("decode", "encode")


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def load_or_create_tokens(path: Path) -> list[str]:
    """One token per line (blank lines and ``#`` comments ignored); a missing file is
    created (0600) with one random token, so the embedded default needs no setup."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(secrets.token_urlsafe(32) + "\n")
        tmp.replace(path)
    tokens = [line.strip() for line in path.read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    short = [t for t in tokens if len(t) < 16]
    if not tokens or short:
        raise ValueError(f"codec token file {path} must hold tokens of at least 16 characters, "
                         "one per line (delete it to have a random one created)")
    return tokens


@dataclass
class CodecPolicy:
    """Who may use the codec: see the module docstring."""

    tokens: Sequence[str]
    allowed_origins: Sequence[str]
    #: "" serves every namespace; otherwise a request whose X-Namespace names another is
    #: refused (one key ring per namespace).
    namespace: str = ""
    mtls: bool = False
    _tokens: tuple[bytes, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tokens = tuple(t.encode() for t in self.tokens)
        self.allowed_origins = tuple(o.rstrip("/") for o in self.allowed_origins)

    def token_ok(self, token: str) -> bool:
        # compare against every token in constant time: no early exit tells which matched
        given = token.encode()
        return any([hmac.compare_digest(given, t) for t in self._tokens])

    def origin_ok(self, origin: str | None) -> bool:
        """Requests without an Origin header come from programs, not from a page."""
        return origin is None or origin.rstrip("/") in self.allowed_origins


def _operation(path: str) -> tuple[str, str | None]:
    """(operation, path token or None) from ``[/prefix...][/<token>]/decode``."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not parts or parts[-1] not in OPERATIONS:
        raise RequestError(HTTPStatus.NOT_FOUND,
                           f"no such endpoint {path!r}: POST .../decode or .../encode")
    return parts[-1], parts[-2] if len(parts) >= 2 else None


def transcode(codec: PayloadCodec, operation: str, body: bytes) -> bytes:
    """One request's body to its answer; RequestError for anything the caller got wrong."""
    try:
        text = body.decode("utf-8")
        message = json_format.Parse(text, Payloads())
    except (UnicodeDecodeError, json_format.ParseError, RecursionError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"the body is not a Payloads message in protobuf JSON: {e}") from e
    try:
        if operation == "decode":
            out = asyncio.run(codec.decode(list(message.payloads)))
        else:
            out = asyncio.run(codec.encode(list(message.payloads)))
    except CodecKeyError as e:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from e
    except (InvalidTag, ValueError) as e:
        # a payload that claims our encoding but does not decrypt (tampered, truncated,
        # or encrypted with a different key under the same id) or whose plaintext is not
        # a Payload
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY,
                           f"a payload does not decrypt with the key it names: {e!r}") from e
    return json_format.MessageToJson(Payloads(payloads=out), indent=None).encode()


class _Handler(BaseHTTPRequestHandler):
    server: CodecHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        log.info("codec %s - %s", self.address_string(), format % args)

    # -- CORS

    def _cors(self) -> dict[str, str]:
        origin = self.headers.get("Origin")
        if origin is None or not self.server.policy.origin_ok(origin):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
                "Vary": "Origin"}

    def do_OPTIONS(self) -> None:
        origin = self.headers.get("Origin")
        if origin is None or not self.server.policy.origin_ok(origin):
            self._reply(HTTPStatus.FORBIDDEN, {"error": f"origin {origin!r} may not use this "
                                               "codec server (--ui-origin)"})
            return
        self._reply(HTTPStatus.NO_CONTENT, None, {
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": ", ".join(ALLOWED_HEADERS),
            "Access-Control-Max-Age": "600",
        })

    # -- the protocol

    def do_POST(self) -> None:
        try:
            operation, path_token = _operation(self.path)
            self._authorize(path_token)
            body = self._body()
            answer = transcode(self.server.codec, operation, body)
        except RequestError as e:
            self._reply(e.status, {"error": str(e)})
            return
        except Exception as e:  # a bug, not the caller's fault: say so, keep serving
            log.exception("codec server: unexpected error")
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {e!r}"})
            return
        self._send(HTTPStatus.OK, answer, "application/json")

    def do_GET(self) -> None:
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "POST .../decode or .../encode"},
                    {"Allow": "POST, OPTIONS"})

    def _authorize(self, path_token: str | None) -> None:
        policy = self.server.policy
        if not policy.origin_ok(self.headers.get("Origin")):
            raise RequestError(HTTPStatus.FORBIDDEN, f"origin {self.headers.get('Origin')!r} "
                               "may not use this codec server (--ui-origin)")
        ns = self.headers.get("X-Namespace")
        if policy.namespace and ns and ns != policy.namespace:
            raise RequestError(HTTPStatus.FORBIDDEN, f"this codec server serves namespace "
                               f"{policy.namespace!r}, not {ns!r}")
        if policy.mtls:
            return  # the TLS handshake required a certificate from the client CA
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and policy.token_ok(token.strip()):
            return
        if path_token is not None and policy.token_ok(path_token):
            return
        raise RequestError(HTTPStatus.UNAUTHORIZED,
                           "a codec token is needed: Authorization: Bearer <token> (the token "
                           "file of `transcend codec-server`)")

    def _body(self) -> bytes:
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                               f"Content-Type must be application/json, not {ctype!r}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is needed") from None
        if length < 0 or length > MAX_BODY:
            self.close_connection = True  # do not read what we refuse
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the body may be at most {MAX_BODY} bytes")
        return self.rfile.read(length)

    def _reply(self, status: HTTPStatus, obj: object, headers: dict[str, str] | None = None) -> None:
        body = b"" if obj is None else json.dumps(obj).encode()
        self._send(status, body, "application/json", headers)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {**self._cors(), **(headers or {})}.items():
            self.send_header(k, v)
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="transcend codec"')
        if body:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # decoded payloads must not be cached
        self.end_headers()
        self.wfile.write(body)


class CodecHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], codec: PayloadCodec, policy: CodecPolicy,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(address, _Handler)
        self.codec = codec
        self.policy = policy
        self.ssl_context = ssl_context
        self._thread: threading.Thread | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS per connection, in that connection's thread: a client that stalls in the
        handshake holds only its own thread, not the accept loop."""
        if self.ssl_context is not None:
            request.settimeout(30)
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.info("codec server: TLS handshake with %s failed: %s", client_address, e)
                return
        super().finish_request(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host!s}:{port}"

    def start(self) -> CodecHTTPServer:
        """Serve in a daemon thread (the CLI's ``server`` runs it beside the dev server)."""
        self._thread = threading.Thread(target=self.serve_forever, name="codec-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def tls_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """HTTPS with ``cert``/``key``; with ``client_ca``, clients must present a certificate
    it signed (mTLS), and that is then the authentication."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


def token_file(s: Settings) -> Path:
    return s.keys_dir / "codec-server.tokens"


def codec_server_for(s: Settings, host: str, port: int, ui_origins: Sequence[str], *,
                     tokens_path: Path | None = None,
                     ssl_context: ssl.SSLContext | None = None,
                     mtls: bool = False) -> tuple[CodecHTTPServer, list[str]]:
    """The codec server over the key ring the workers use (transcend.client.codec_keys),
    for ``s``'s namespace; with the tokens it accepts (created on first use)."""
    from transcend.client import codec_keys
    from transcend.codec import EncryptionCodec

    tokens = load_or_create_tokens(tokens_path or token_file(s))
    policy = CodecPolicy(tokens=tokens, allowed_origins=ui_origins,
                         namespace=s.temporal_namespace, mtls=mtls)
    server = CodecHTTPServer((host, port), EncryptionCodec(codec_keys(s)), policy, ssl_context)
    return server, tokens


def embedded_for_ui(s: Settings, ui_port: int, codec_port: int) -> tuple[CodecHTTPServer, str]:
    """The codec server for the embedded dev UI on this machine, started, and the endpoint
    to give the dev server (``--ui-codec-endpoint``). The dev UI has no login to take a
    token from, so the token is the endpoint's path segment: whoever can open this UI can
    decode, which is why the UI and this server listen on 127.0.0.1 only."""
    server, tokens = codec_server_for(
        s, "127.0.0.1", codec_port,
        [f"http://127.0.0.1:{ui_port}", f"http://localhost:{ui_port}"])
    return server.start(), f"{server.url}/{tokens[0]}"

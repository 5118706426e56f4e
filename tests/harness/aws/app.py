"""The simulator's one WSGI application: authentication, fault injection, statistics, and
dispatch to the EBS model (paths under /snapshots, signed for ``ebs``), to moto (EC2 and
STS) and to the unsigned test-only admin API under /_model/."""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode
from xml.sax.saxutils import escape

from tests.harness.aws import sigv4
from tests.harness.aws.ebs_api import EbsApi, Response, error_response, json_response, operation
from tests.harness.aws.ebs_model import EbsModel
from tests.harness.aws.ec2_join import Ec2Error, Ec2Join

ERROR_KINDS = ("throttle", "throttle_request", "500", "503")
FAULT_KINDS = (*ERROR_KINDS, "corrupt", "quota")
QUOTA_OPS = ("StartSnapshot", "CreateSnapshot", "CreateSnapshots")
MOTO_SERVICES = ("ec2", "sts")

StartResponse = Callable[..., Any]


@dataclass
class Fault:
    kind: str
    count: int
    api: str | None = None


@dataclass
class Config:
    access_key: str
    secret_key: str
    region: str
    account: str


@dataclass
class Stats:
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    auth_failures: int = 0

    def bump(self, op: str, what: str) -> None:
        c = self.calls.setdefault(op, {"served": 0, "injected": 0, "errors": 0})
        c[what] += 1

    def view(self) -> dict[str, Any]:
        return {"calls": self.calls, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "auth_failures": self.auth_failures}


def _xml_error(code: str, message: str, status: int) -> Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{escape(code)}'
            f"</Code><Message>{escape(message)}</Message></Error></Errors>"
            f"<RequestID>{uuid.uuid4()}</RequestID></Response>")
    return Response(status, body.encode(), [("Content-Type", "text/xml;charset=UTF-8")])


def _sts_error(code: str, message: str, status: int) -> Response:
    body = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
            f"<Type>Sender</Type><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"</Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>")
    return Response(status, body.encode(), [("Content-Type", "text/xml")])


def _read_body(environ: dict[str, Any]) -> bytes:
    length = environ.get("CONTENT_LENGTH")
    if length:
        return bytes(environ["wsgi.input"].read(int(length)))
    if environ.get("wsgi.input_terminated") or \
            "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return bytes(environ["wsgi.input"].read())
    return b""


class SimApp:
    def __init__(self, cfg: Config, model: EbsModel, join: Ec2Join,
                 moto_app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]) -> None:
        self.cfg = cfg
        self.model = model
        self.join = join
        self.moto_app = moto_app
        self.faults: list[Fault] = []
        self.stats = Stats()
        self.meta = threading.Lock()  # faults and stats
        self.ebs = EbsApi(model, quota=self._take_quota, corrupt=self._take_corrupt,
                          count_bytes=self._count_bytes)
        join.quota = self._take_quota

    # ------------------------------------------------------------------ faults

    def _take(self, op: str, kinds: tuple[str, ...], *, default_ops: tuple[str, ...]) -> str | None:
        """Consume one matching fault: ``api`` names the operation, or (None) any of
        ``default_ops`` (every EBS operation for error kinds)."""
        with self.meta:
            for f in self.faults:
                if f.kind in kinds and (f.api == op or (f.api is None and op in default_ops)):
                    f.count -= 1
                    if f.count <= 0:
                        self.faults.remove(f)
                    return f.kind
        return None

    def _take_quota(self, op: str) -> bool:
        if self._take(op, ("quota",), default_ops=QUOTA_OPS):
            self._bump(op, "injected")
            return True
        return False

    def _take_corrupt(self, op: str) -> bool:
        return self._take(op, ("corrupt",), default_ops=("GetSnapshotBlock",)) is not None

    def _bump(self, op: str, what: str) -> None:
        with self.meta:
            self.stats.bump(op, what)

    def _count_bytes(self, what: str, n: int) -> None:
        with self.meta:
            if what == "read":
                self.stats.bytes_read += n
            else:
                self.stats.bytes_written += n

    # ------------------------------------------------------------------ credentials

    def _secret_for(self, access_key: str, token: str | None) -> str | None:
        if access_key == self.cfg.access_key:
            return self.cfg.secret_key if token is None else None
        # temporary credentials moto's STS AssumeRole issued in this account
        from moto.sts.models import sts_backends

        for role in sts_backends[self.cfg.account]["aws"].assumed_roles:
            if role.access_key_id == access_key and role.account_id == self.cfg.account:
                return str(role.secret_access_key) if token == role.session_token else None
        return None

    # ------------------------------------------------------------------ WSGI

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            resp = self.dispatch(environ)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            resp = error_response("InternalServerException", 500,
                                  "the AWS simulator failed: see its log")
        reason = {200: "OK", 201: "Created", 202: "Accepted"}.get(resp.status, "Error")
        headers = [*resp.headers, ("Content-Length", str(len(resp.body)))]
        start_response(f"{resp.status} {reason}", headers)
        return [resp.body]

    def dispatch(self, environ: dict[str, Any]) -> Response:
        path = environ.get("PATH_INFO", "/")
        if path.startswith("/_model/"):
            return self.admin(environ, path[len("/_model/"):])
        body = _read_body(environ)
        cred = sigv4.parse_credential(environ)
        service = cred.service if cred else ("ebs" if path.startswith("/snapshots") else "ec2")
        if service == "ebs":
            return self.handle_ebs(environ, path, body)
        if service in MOTO_SERVICES:
            return self.handle_moto(environ, service, body)
        return error_response("UnknownServiceException", 400,
                              f"service {service!r} is not simulated here (only ebs, ec2, sts)")

    def _auth(self, environ: dict[str, Any], body: bytes, service: str) -> sigv4.AuthResult:
        res = sigv4.verify(environ, body, region=self.cfg.region, service=service,
                           secret_for=self._secret_for)
        if not res.ok:
            with self.meta:
                self.stats.auth_failures += 1
            print(f"auth failure ({service}): {res.reason}: {res.detail}", file=sys.stderr)
        return res

    # ------------------------------------------------------------------ EBS

    def handle_ebs(self, environ: dict[str, Any], path: str, body: bytes) -> Response:
        res = self._auth(environ, body, "ebs")
        if not res.ok:
            return error_response("AccessDeniedException", 403,
                                  f"The request was denied: {res.detail}.", "UNAUTHORIZED_ACCOUNT")
        route = operation(environ["REQUEST_METHOD"], path)
        if route is None:
            return error_response("UnknownOperationException", 404, f"no EBS operation at {path}")
        op, args = route
        kind = self._take(op, ERROR_KINDS, default_ops=(op,))
        if kind is not None:
            self._bump(op, "injected")
            return self._ebs_fault(kind)
        headers = {k[5:].lower().replace("_", "-"): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        with self.model.lock:
            resp = self.ebs.handle(op, args, environ.get("QUERY_STRING", ""), headers, body)
        self._bump(op, "served")
        if resp.status >= 400:
            self._bump(op, "errors")
        return resp

    @staticmethod
    def _ebs_fault(kind: str) -> Response:
        if kind == "throttle":
            return error_response("ThrottlingException", 400, "Rate exceeded")
        if kind == "throttle_request":
            return error_response("RequestThrottledException", 400,
                                  "The request was throttled.", "ACCOUNT_THROTTLED")
        if kind == "500":
            return error_response("InternalServerException", 500, "An internal error occurred.")
        return error_response("ServiceUnavailableException", 503, "The service is unavailable.")

    # ------------------------------------------------------------------ EC2 / STS (moto)

    def handle_moto(self, environ: dict[str, Any], service: str, body: bytes) -> Response:
        query = environ.get("QUERY_STRING", "")
        pairs = parse_qsl(query, keep_blank_values=True)
        ctype = environ.get("CONTENT_TYPE", "")
        if body and "x-www-form-urlencoded" in ctype:
            pairs += parse_qsl(body.decode(), keep_blank_values=True)
        action = dict(pairs).get("Action", "?")
        res = self._auth(environ, body, service)
        if not res.ok:
            if service == "sts":
                code = "InvalidClientTokenId" if res.reason == "unknown-key" else "SignatureDoesNotMatch"
                return _sts_error(code, "The security token included in the request is invalid."
                                  if code == "InvalidClientTokenId" else res.detail, 403)
            return _xml_error("AuthFailure", "AWS was not able to validate the provided access "
                              f"credentials ({res.detail})", 401)
        kind = self._take(action, ERROR_KINDS, default_ops=())
        if kind is not None:
            self._bump(action, "injected")
            if kind in ("throttle", "throttle_request"):
                return _xml_error("RequestLimitExceeded", "Request limit exceeded.", 503)
            if kind == "500":
                return _xml_error("InternalError", "An internal error has occurred.", 500)
            return _xml_error("Unavailable", "The server is overloaded.", 503)
        with self.model.lock:
            if service == "ec2":
                try:
                    new_pairs = self.join.before(action, pairs)
                except Ec2Error as e:
                    self._bump(action, "served")
                    self._bump(action, "errors")
                    return _xml_error(e.code, e.message, e.status)
                if new_pairs is not pairs:
                    body = urlencode(new_pairs).encode()
                    environ = dict(environ, QUERY_STRING="",
                                   CONTENT_TYPE="application/x-www-form-urlencoded; charset=utf-8")
                    pairs = new_pairs
            resp = self._call_moto(environ, body)
            if service == "ec2":
                self.join.after(action, pairs, resp.status, resp.body)
        self._bump(action, "served")
        if resp.status >= 400:
            self._bump(action, "errors")
        return resp

    def _call_moto(self, environ: dict[str, Any], body: bytes) -> Response:
        env = dict(environ)
        env["wsgi.input"] = io.BytesIO(body)
        env["CONTENT_LENGTH"] = str(len(body))
        captured: dict[str, Any] = {}

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured["status"] = int(status.split()[0])
            captured["headers"] = [(k, v) for k, v in headers if k.lower() != "content-length"]

        chunks = self.moto_app(env, start)
        try:
            data = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        return Response(captured.get("status", 500), data, captured.get("headers", []))

    # ------------------------------------------------------------------ admin

    def admin(self, environ: dict[str, Any], what: str) -> Response:
        method = environ["REQUEST_METHOD"]
        raw = _read_body(environ)
        try:
            req: dict[str, Any] = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return json_response(400, {"error": "the body is not JSON"})
        try:
            return self._admin(method, what.strip("/"), req)
        except (KeyError, TypeError, ValueError) as e:
            return json_response(400, {"error": f"bad admin request: {e!r}"})

    def _admin(self, method: str, what: str, req: dict[str, Any]) -> Response:
        if what == "health":
            return json_response(200, {"ok": True, "region": self.cfg.region})
        m = re.fullmatch(r"volume/(vol-[0-9a-f]+)", what)
        if m and method == "GET":
            with self.model.lock:
                info = self.join.volume_info(m.group(1))
            return json_response(200, info) if info else json_response(404, {"error": "no such volume"})
        m = re.fullmatch(r"snapshot/(snap-[0-9a-f]+)", what)
        if m and method == "GET":
            snap = self.model.get(m.group(1))
            if snap is None:
                return json_response(404, {"error": "no such snapshot in the model"})
            return json_response(200, snap.summary())
        if what == "faults":
            if method == "POST":
                kind = str(req["kind"])
                if kind not in FAULT_KINDS:
                    raise ValueError(f"kind must be one of {FAULT_KINDS}")
                with self.meta:
                    self.faults.append(Fault(kind=kind, count=int(req.get("count", 1)),
                                             api=req.get("api")))
            elif method == "DELETE":
                with self.meta:
                    self.faults.clear()
            with self.meta:
                return json_response(200, {"faults": [f.__dict__ for f in self.faults]})
        if what == "empty_pages" and method == "POST":
            with self.model.lock:
                self.model.empty_pages = int(req.get("count", 1))
            return json_response(200, {"empty_pages": self.model.empty_pages})
        if what == "clock":
            with self.model.lock:
                if method == "POST":
                    self.model.clock.advance(float(req.get("advance_seconds", 0)))
                    self.model.sweep()
                return json_response(200, {"now": self.model.clock.now(),
                                           "offset": self.model.clock.offset})
        if what == "stats" and method == "GET":
            with self.meta:
                return json_response(200, json.loads(json.dumps(self.stats.view())))
        if what == "stats/reset" and method == "POST":
            with self.meta:
                self.stats = Stats()
            return json_response(200, {"ok": True})
        if what == "resources" and method == "GET":
            with self.model.lock:
                self.model.sweep()
                return json_response(200, self.join.resources())
        return json_response(404, {"error": f"no admin endpoint {method} /_model/{what}"})

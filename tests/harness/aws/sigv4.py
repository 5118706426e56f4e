"""Check a received request's AWS Signature Version 4 (Authorization header).

The canonical request is rebuilt from what arrived (raw path and query, the headers the
client listed in SignedHeaders, the body) and signed again with botocore's own
``SigV4Auth`` and the secret the simulator was given; the signature must match. Only
header-signed requests are accepted (no presigned query strings).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+)\s*,\s*SignedHeaders=(?P<signed>[^,\s]+)"
    r"\s*,\s*Signature=(?P<sig>[0-9a-f]{64})\s*$")
_UNSIGNED = ("UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER")


@dataclass
class Credential:
    access_key: str
    date: str
    region: str
    service: str


@dataclass
class AuthResult:
    ok: bool
    reason: str  # "ok", "missing", "malformed", "unknown-key", "bad-signature", "scope"
    detail: str
    credential: Credential | None = None


def parse_credential(environ: dict[str, Any]) -> Credential | None:
    """The credential scope of the Authorization header, or None when there is none."""
    m = _AUTH_RE.match(environ.get("HTTP_AUTHORIZATION", ""))
    if not m:
        return None
    parts = m.group("cred").split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        return None
    return Credential(access_key=parts[0], date=parts[1], region=parts[2], service=parts[3])


def _header(environ: dict[str, Any], name: str) -> str | None:
    if name == "content-type":
        value = environ.get("CONTENT_TYPE")
    elif name == "content-length":
        value = environ.get("CONTENT_LENGTH")
    else:
        value = environ.get("HTTP_" + name.upper().replace("-", "_"))
    return None if value is None else str(value)


def verify(environ: dict[str, Any], body: bytes, *, region: str, service: str,
           secret_for: Callable[[str, str | None], str | None]) -> AuthResult:
    """``secret_for(access_key, session_token)`` returns the secret of a key it accepts."""
    auth = environ.get("HTTP_AUTHORIZATION")
    if not auth:
        return AuthResult(False, "missing", "the request is not signed")
    m = _AUTH_RE.match(auth)
    cred = parse_credential(environ)
    if m is None or cred is None:
        return AuthResult(False, "malformed", "the Authorization header is not AWS4-HMAC-SHA256")
    amz_date = environ.get("HTTP_X_AMZ_DATE", "")
    if not re.fullmatch(r"\d{8}T\d{6}Z", amz_date) or amz_date[:8] != cred.date:
        return AuthResult(False, "malformed", "X-Amz-Date is missing or does not match the "
                          "credential scope", cred)
    if cred.region != region:
        return AuthResult(False, "scope", f"the credential is scoped to region {cred.region!r}, "
                          f"this endpoint is {region!r}", cred)
    if cred.service != service:
        return AuthResult(False, "scope", f"the credential is scoped to service "
                          f"{cred.service!r}, not {service!r}", cred)
    token = environ.get("HTTP_X_AMZ_SECURITY_TOKEN")
    secret = secret_for(cred.access_key, token)
    if secret is None:
        return AuthResult(False, "unknown-key", f"access key {cred.access_key!r} is not known",
                          cred)

    signed = m.group("signed").split(";")
    headers: dict[str, str] = {}
    for name in signed:
        value = _header(environ, name)
        if value is None:
            return AuthResult(False, "bad-signature", f"signed header {name!r} is missing", cred)
        headers[name] = value
    content_sha = headers.get("x-amz-content-sha256")
    if content_sha is not None and content_sha not in _UNSIGNED and \
            content_sha != hashlib.sha256(body).hexdigest():
        return AuthResult(False, "bad-signature", "x-amz-content-sha256 does not match the body",
                          cred)
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
    path, _, query = raw_uri.partition("?")
    query = query or environ.get("QUERY_STRING", "")
    url = f"http://{headers.get('host') or environ.get('HTTP_HOST', 'localhost')}{path}"
    if query:
        url += "?" + query
    request = AWSRequest(method=environ["REQUEST_METHOD"], url=url, headers=headers, data=body)
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(cred.access_key, secret, token), service, region)
    canonical = signer.canonical_request(request)
    if signer.signed_headers(signer.headers_to_sign(request)) != m.group("signed"):
        return AuthResult(False, "bad-signature", "SignedHeaders are not canonical", cred)
    want = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(want, m.group("sig")):
        return AuthResult(False, "bad-signature", "the signature does not match (wrong secret "
                          "key, or the request was changed)", cred)
    return AuthResult(True, "ok", "", cred)

"""The codec server (issue #23): decodes what a worker encoded, only for a caller with a
token (or a client certificate), answers CORS only for the UI's origin, and answers
anything malformed with a 4xx: it faces a browser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from temporalio.api.common.v1 import Payload, Payloads

from temporal.devserver import free_port
from transcend import pki
from transcend.api import ReplicationInput
from transcend.codec import EncryptionCodec, data_converter, load_or_create_keys
from transcend.codec_server import (
    MAX_BODY,
    CodecHTTPServer,
    CodecPolicy,
    load_or_create_tokens,
    tls_context,
)
from transcend.models import ProtectionPolicy, ProtectionSpec

UI = "http://127.0.0.1:8233"
TOKEN = "t0ken-for-the-codec-tests-0123456789"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return load_or_create_keys(tmp_path_factory.mktemp("keys") / "payload.keys")


@pytest.fixture(scope="module")
def codec_url(keys: list[bytes]) -> Iterator[str]:
    srv = CodecHTTPServer(("127.0.0.1", free_port()), EncryptionCodec(keys),
                          CodecPolicy(tokens=[TOKEN], allowed_origins=[UI], namespace="default"))
    srv.start()
    try:
        yield srv.url
    finally:
        srv.stop()


def _input() -> ReplicationInput:
    return ReplicationInput(protection="payroll", spec=ProtectionSpec(
        name="payroll", source_platform="src", workloads=["payroll-db"], target_platform="dst",
        policy=ProtectionPolicy(rpo_seconds=1234)))


def _encoded(keys: list[bytes]) -> tuple[Payloads, bytes]:
    """What a worker stores in history for the input, and the plain JSON payload data."""
    dc = data_converter(keys)
    clear = dc.payload_converter.to_payloads([_input()])
    encrypted = asyncio.run(dc.encode([_input()]))
    return Payloads(payloads=encrypted), clear[0].data


def _post(url: str, body: bytes | str, **headers: str) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json", **headers},
                         timeout=10)


def test_decodes_what_a_worker_encoded_for_a_token_holder(codec_url: str, keys: list[bytes]) -> None:
    payloads, clear = _encoded(keys)
    body = json_format.MessageToJson(payloads)
    assert "payroll" not in body and "rpo_seconds" not in body  # what history holds
    r = _post(f"{codec_url}/decode", body, Authorization=f"Bearer {TOKEN}", **{"X-Namespace": "default"})
    assert r.status_code == 200, r.text
    out = json_format.Parse(r.text, Payloads())
    assert out.payloads[0].data == clear
    assert out.payloads[0].metadata["encoding"] == b"json/plain"
    assert json.loads(clear)["spec"]["policy"]["rpo_seconds"] == 1234
    # the token as a path segment (the embedded UI's endpoint) and any prefix work too
    r = _post(f"{codec_url}/some/prefix/{TOKEN}/decode", body)
    assert r.status_code == 200 and json_format.Parse(r.text, Payloads()).payloads[0].data == clear
    # encode gives what decodes back to the same payload, under the workers' key
    r = _post(f"{codec_url}/encode", json_format.MessageToJson(Payloads(payloads=[
        Payload(metadata={"encoding": b"json/plain"}, data=clear)])), Authorization=f"Bearer {TOKEN}")
    assert r.status_code == 200, r.text
    enc = json_format.Parse(r.text, Payloads()).payloads
    assert enc[0].metadata["encoding"] == b"binary/encrypted" and clear not in enc[0].data
    assert asyncio.run(EncryptionCodec(keys).decode(list(enc)))[0].data == clear


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token-wrong-token"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"},
    {"Authorization": f"Bearer {TOKEN}", "X-Namespace": "other"},
])
def test_refuses_without_a_valid_token_or_from_another_origin(
        codec_url: str, keys: list[bytes], headers: dict[str, str]) -> None:
    payloads, clear = _encoded(keys)
    for path in ("/decode", "/wrong-token-wrong-token/decode"):
        r = _post(codec_url + path, json_format.MessageToJson(payloads), **headers)
        assert r.status_code in (401, 403), (path, headers, r.status_code)
        assert b"payroll" not in r.content and clear not in r.content
        assert "Access-Control-Allow-Origin" not in r.headers or headers.get("Origin") == UI


def test_cors_preflight_only_for_the_ui_origin(codec_url: str, keys: list[bytes]) -> None:
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type,x-namespace,authorization"}
    r = requests.options(f"{codec_url}/decode", headers={"Origin": UI, **ask}, timeout=10)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == UI
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "x-namespace", "authorization"} <= allowed
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    for origin in ("http://evil.example", "http://127.0.0.1:8234", "null"):
        r = requests.options(f"{codec_url}/decode", headers={"Origin": origin, **ask}, timeout=10)
        assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers, origin
    # the real request from the UI carries the CORS answer the browser checks
    payloads, _ = _encoded(keys)
    r = _post(f"{codec_url}/decode", json_format.MessageToJson(payloads), Origin=UI,
              Authorization=f"Bearer {TOKEN}")
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == UI
    assert r.headers["Cache-Control"] == "no-store"


def test_wrong_requests_get_the_status_that_says_why(codec_url: str, keys: list[bytes]) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{codec_url}/decode", timeout=10).status_code == 405
    assert _post(f"{codec_url}/decrypt", "{}", **auth).status_code == 404
    r = requests.post(f"{codec_url}/decode", data="{}", headers={"Content-Type": "text/plain", **auth},
                      timeout=10)
    assert r.status_code == 415
    r = _post(f"{codec_url}/decode", b"x" * (MAX_BODY + 1), **auth)
    assert r.status_code == 413
    # claims our encoding but was tampered with: 422, not a 500 and not garbage
    payloads, _ = _encoded(keys)
    p = payloads.payloads[0]
    p.data = p.data[:-1] + bytes([p.data[-1] ^ 1])
    r = _post(f"{codec_url}/decode", json_format.MessageToJson(payloads), **auth)
    assert r.status_code == 422 and "does not decrypt" in r.json()["error"]
    p.metadata["encryption-key-id"] = b"0000000000000000"
    r = _post(f"{codec_url}/decode", json_format.MessageToJson(payloads), **auth)
    assert r.status_code == 422 and "unknown key id" in r.json()["error"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                      max_size=4),
    max_leaves=20)
_payloadish = st.fixed_dictionaries({"payloads": st.lists(st.fixed_dictionaries({
    "metadata": st.dictionaries(st.sampled_from(["encoding", "encryption-key-id", "x"]),
                                st.sampled_from(["YmluYXJ5L2VuY3J5cHRlZA==", "anNvbi9wbGFpbg==",
                                                 "!!", "", "AAAA"])),
    "data": st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=!",
                    max_size=40)}), max_size=3)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(_json.map(json.dumps), _payloadish.map(json.dumps),
                      st.binary(max_size=200)))
def test_fuzzed_bodies_get_a_4xx_or_a_valid_answer(codec_url: str, body: str | bytes) -> None:
    r = _post(f"{codec_url}/decode", body, Authorization=f"Bearer {TOKEN}")
    assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code == 200:
        json_format.Parse(r.text, Payloads())  # an answer is always a Payloads message
    else:
        assert "error" in r.json()


def test_mtls_client_certificate_is_the_authentication(tmp_path: Path, keys: list[bytes]) -> None:
    pki.init_ca(tmp_path)
    bundle = pki.issue_site(tmp_path, "codec", ips=["127.0.0.1"])
    d = bundle.directory
    ctx = tls_context(str(d / pki.SERVER_CERT), str(d / pki.SERVER_KEY), str(d / pki.CA_CERT))
    srv = CodecHTTPServer(("127.0.0.1", free_port()), EncryptionCodec(keys),
                          CodecPolicy(tokens=[TOKEN], allowed_origins=[UI], mtls=True), ctx).start()
    try:
        payloads, clear = _encoded(keys)
        body = json_format.MessageToJson(payloads)
        r = requests.post(f"{srv.url}/decode", data=body, timeout=10,
                          headers={"Content-Type": "application/json"},
                          cert=(str(d / pki.CLIENT_CERT), str(d / pki.CLIENT_KEY)),
                          verify=str(d / pki.CA_CERT))
        assert r.status_code == 200 and json_format.Parse(r.text, Payloads()).payloads[0].data == clear
        with pytest.raises(requests.exceptions.SSLError):  # no client certificate: no handshake
            requests.post(f"{srv.url}/decode", data=body, timeout=10, verify=str(d / pki.CA_CERT),
                          headers={"Content-Type": "application/json",
                                   "Authorization": f"Bearer {TOKEN}"})
    finally:
        srv.stop()


def test_token_file_is_created_private_and_short_tokens_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "codec-server.tokens"
    tokens = load_or_create_tokens(path)
    assert len(tokens) == 1 and len(tokens[0]) >= 32
    assert path.stat().st_mode & 0o077 == 0
    assert load_or_create_tokens(path) == tokens  # kept across restarts
    path.write_text("# comment\nshort\n")
    with pytest.raises(ValueError, match="at least 16 characters"):
        load_or_create_tokens(path)

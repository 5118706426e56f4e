"""The payload codec: what Temporal stores is ciphertext; keys rotate without losing
old histories; a wrong or tampered payload fails loudly."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from temporalio.api.common.v1 import Payload

from transcend.codec import ENCODING, CodecKeyError, EncryptionCodec, data_converter, load_or_create_keys
from transcend.models import PlatformKind, PlatformSpec

SECRET = "correct-horse-battery-staple"


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "payload.keys"
    keys = load_or_create_keys(path)
    assert len(keys) == 1 and len(keys[0]) == 32
    assert path.stat().st_mode & 0o077 == 0
    assert load_or_create_keys(path) == keys


def test_bad_key_files_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_text("not json")
    with pytest.raises(CodecKeyError, match="JSON list of base64"):
        load_or_create_keys(p)
    p.write_text(json.dumps([base64.b64encode(b"short").decode()]))
    with pytest.raises(CodecKeyError, match="32-byte"):
        load_or_create_keys(p)


def test_payloads_are_ciphertext_and_round_trip() -> None:
    key = b"k" * 32
    conv = data_converter([key])
    spec = PlatformSpec(name="vc1", kind=PlatformKind.KVM, secret={"password": SECRET})
    plain = conv.payload_converter.to_payloads([spec])
    codec = EncryptionCodec([key])
    encoded = asyncio.run(codec.encode(plain))
    assert all(p.metadata["encoding"] == ENCODING for p in encoded)
    assert all(SECRET.encode() not in p.SerializeToString() for p in encoded)
    assert all(b"vc1" not in p.data for p in encoded)
    decoded = asyncio.run(codec.decode(encoded))
    (back,) = conv.payload_converter.from_payloads(decoded, [PlatformSpec])
    assert back == spec


def test_rotation_old_payloads_still_decode_new_use_new_key() -> None:
    old, new = b"o" * 32, b"n" * 32
    plain = data_converter([old]).payload_converter.to_payloads(["hello"])
    before = asyncio.run(EncryptionCodec([old]).encode(plain))
    rotated = EncryptionCodec([new, old])
    assert asyncio.run(rotated.decode(before)) == plain
    after = asyncio.run(rotated.encode(plain))
    assert after[0].metadata["encryption-key-id"] != before[0].metadata["encryption-key-id"]
    with pytest.raises(CodecKeyError, match="unknown key id"):
        asyncio.run(EncryptionCodec([old]).decode(after))


def test_tampered_payload_is_refused() -> None:
    key = b"t" * 32
    codec = EncryptionCodec([key])
    (p,) = asyncio.run(codec.encode(data_converter([key]).payload_converter.to_payloads(["x" * 64])))
    data = bytearray(p.data)
    data[-1] ^= 1
    bad = Payload(metadata=dict(p.metadata), data=bytes(data))
    with pytest.raises(InvalidTag):
        asyncio.run(codec.decode([bad]))

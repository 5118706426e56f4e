"""Encrypting payload codec: no workflow input, result, heartbeat or signal is stored
in Temporal's history in clear text (DESIGN.md invariant 5).

AES-256-GCM per payload with a random 96-bit nonce; the key id travels in the
payload metadata so keys can be rotated: new payloads use the first key of the
key file, old ones are decrypted by whichever key their id names. Rotation is
documented in docs/operations.md.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Sequence
from hashlib import sha256
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter, PayloadCodec
from temporalio.converter import default as default_converter

ENCODING = b"binary/encrypted"


class CodecKeyError(Exception):
    pass


def load_or_create_keys(path: Path) -> list[bytes]:
    """Key file: JSON list of base64 keys, newest first. Created (0600) when missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([key], f)
        os.replace(tmp, path)
    try:
        keys = [base64.b64decode(k) for k in json.loads(path.read_text())]
    except (ValueError, TypeError) as e:
        raise CodecKeyError(f"payload key file {path} is not a JSON list of base64 keys") from e
    if not keys or any(len(k) != 32 for k in keys):
        raise CodecKeyError(f"payload key file {path} must hold 32-byte AES keys")
    return keys


def _key_id(key: bytes) -> bytes:
    return sha256(key).hexdigest()[:16].encode()


class EncryptionCodec(PayloadCodec):
    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise CodecKeyError("at least one payload key is needed")
        self._encrypt_key = AESGCM(keys[0])
        self._encrypt_id = _key_id(keys[0])
        self._by_id = {_key_id(k): AESGCM(k) for k in keys}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            nonce = os.urandom(12)
            data = nonce + self._encrypt_key.encrypt(nonce, p.SerializeToString(), None)
            out.append(
                Payload(metadata={"encoding": ENCODING, "encryption-key-id": self._encrypt_id}, data=data)
            )
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            if p.metadata.get("encoding") != ENCODING:
                out.append(p)
                continue
            key_id = p.metadata.get("encryption-key-id", b"")
            aes = self._by_id.get(key_id)
            if aes is None:
                raise CodecKeyError(
                    f"payload encrypted with unknown key id {key_id.decode(errors='replace')}; "
                    "add the old key to the key file (keys rotate, they are never dropped "
                    "while histories that use them exist)"
                )
            decoded = Payload()
            decoded.ParseFromString(aes.decrypt(p.data[:12], p.data[12:], None))
            out.append(decoded)
        return out


def data_converter(keys: Iterable[bytes]) -> DataConverter:
    """Pydantic JSON payloads (workflow inputs that do not validate fail their workflow:
    transcend/converter.py), encrypted."""
    from transcend.converter import TranscendPayloadConverter

    return DataConverter(payload_converter_class=TranscendPayloadConverter,
                         payload_codec=EncryptionCodec(list(keys)))


__all__ = ["EncryptionCodec", "data_converter", "default_converter", "load_or_create_keys"]

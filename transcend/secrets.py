"""Encryption of the credentials kept in the catalog.

Platform credentials (``PlatformSpec.secret``) are stored only as Fernet tokens
(AES-128-CBC + HMAC-SHA256, from ``cryptography``). The key lives in a key file
next to the catalog (``$TRANSCEND_HOME/keys/catalog.key`` by default, or
``TRANSCEND_SECRET_KEY_FILE``), never in the catalog itself, so a copy of the
catalog database alone reveals no credential.

A key file holds one or more keys, one per line; the first one encrypts, all of
them decrypt (``MultiFernet``). That is how keys are rotated (docs/catalog.md):

1. ``SecretBox.rotate_key_file(path)`` puts a new key on the first line and keeps
   the old ones below it;
2. ``Catalog.reencrypt_secrets()`` re-encrypts every stored credential with the
   new key;
3. the old lines can then be removed from the key file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = ["SecretBox", "SecretError"]


class SecretError(Exception):
    """A secret cannot be read: wrong or missing key, unreadable key file."""


def _as_key(key: bytes | str) -> bytes:
    return key.encode("ascii") if isinstance(key, str) else bytes(key)


class SecretBox:
    """Encrypts JSON-able dicts with Fernet; ``keys[0]`` encrypts, every key decrypts."""

    def __init__(self, keys: Sequence[bytes | str], *, source: str = "") -> None:
        if isinstance(keys, (bytes, str)):
            raise TypeError("SecretBox(keys=[...]) takes a list of keys, newest first")
        if not keys:
            raise SecretError(f"no encryption key given{' in ' + source if source else ''}")
        try:
            fernets = [Fernet(_as_key(k)) for k in keys]
        except (ValueError, TypeError) as e:
            where = f" in {source}" if source else ""
            raise SecretError(
                f"invalid encryption key{where}: each key must be 32 url-safe base64-encoded "
                f"bytes as made by SecretBox.generate_key() ({e})"
            ) from e
        self._fernet = MultiFernet(fernets)
        self._count = len(fernets)
        self.source = source

    # ------------------------------------------------------------------ keys

    @staticmethod
    def generate_key() -> bytes:
        return Fernet.generate_key()

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> SecretBox:
        """Load the keys in ``path`` (one per line, newest first), creating the file with
        a fresh key (mode 0600, parent directory 0700 when it is created) if it is missing."""
        p = Path(path)
        if not p.exists():
            _create_key_file(p, [cls.generate_key()])
        return cls(_read_key_file(p), source=str(p))

    @classmethod
    def rotate_key_file(cls, path: str | os.PathLike[str]) -> SecretBox:
        """Put a new key first in ``path``, keeping the old keys after it so existing
        secrets still decrypt; returns the box for the new file. Follow with
        ``Catalog.reencrypt_secrets()``, then the old lines may be removed."""
        p = Path(path)
        old = _read_key_file(p) if p.exists() else []
        keys = [cls.generate_key(), *old]
        _write_key_file(p, keys, replace=True)
        return cls(keys, source=str(p))

    @property
    def key_count(self) -> int:
        return self._count

    # ------------------------------------------------------------------ data

    def encrypt(self, data: dict[str, Any]) -> str:
        if not isinstance(data, dict):
            raise TypeError(f"SecretBox.encrypt takes a dict, not {type(data).__name__}")
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return self._fernet.encrypt(raw).decode("ascii")

    def decrypt(self, token: str) -> dict[str, Any]:
        try:
            raw = self._fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError) as e:
            raise SecretError(self._mismatch()) from e
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise SecretError("decrypted secret is not a JSON object; the catalog row is damaged")
        return value

    def rotate(self, token: str) -> str:
        """Re-encrypt ``token`` with the first key (it may have been made with any key)."""
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeEncodeError) as e:
            raise SecretError(self._mismatch()) from e

    def _mismatch(self) -> str:
        where = f"the secret key file {self.source}" if self.source else "the secret key"
        return (
            f"{where} does not match the catalog: the stored credentials were encrypted with "
            "another key. Point TRANSCEND_SECRET_KEY_FILE (or secret_key_file) at the key file "
            "that was used with this catalog (by default $TRANSCEND_HOME/keys/catalog.key), "
            "or, if that key is lost, add the platforms again with their credentials "
            "(`transcend platform add --replace`)."
        )

    def __repr__(self) -> str:
        return f"SecretBox(keys=<{self._count}>, source={self.source!r})"


def _read_key_file(p: Path) -> list[bytes]:
    try:
        text = p.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"cannot read the secret key file {p}: {e}") from e
    keys = [line.strip().encode("ascii") for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith(b"#")]
    if not keys:
        raise SecretError(
            f"the secret key file {p} holds no key; restore it from a backup "
            "(delete it only if the catalog holds no credentials yet)"
        )
    return keys


def _create_key_file(p: Path, keys: list[bytes]) -> None:
    _write_key_file(p, keys, replace=False)


def _write_key_file(p: Path, keys: list[bytes], *, replace: bool) -> None:
    """Write atomically with mode 0600; without ``replace`` an existing file (a concurrent
    creator won the race) is kept as it is."""
    if not p.parent.exists():
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(p.parent, 0o700)  # mkdir's mode is subject to the umask
    fd, tmp = tempfile.mkstemp(prefix=".key-", dir=p.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(k + b"\n" for k in keys))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if replace:
            os.replace(tmp, p)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, p)
            os.unlink(tmp)
        dir_fd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

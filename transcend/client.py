"""Connecting to Temporal the same way from the worker, the CLI and other programs:
the encrypting payload codec always, TLS/mTLS when configured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from temporalio.client import Client, Interceptor, TLSConfig
from temporalio.runtime import Runtime

from transcend.codec import data_converter, load_or_create_keys
from transcend.config import Settings, settings


def codec_keys(s: Settings) -> list[bytes]:
    return load_or_create_keys(Path(s.codec_key_file) if s.codec_key_file else s.keys_dir / "payload.keys")


def tls_config(s: Settings) -> TLSConfig | bool:
    if not (s.temporal_tls_cert or s.temporal_tls_ca):
        return False
    return TLSConfig(
        server_root_ca_cert=Path(s.temporal_tls_ca).read_bytes() if s.temporal_tls_ca else None,
        client_cert=Path(s.temporal_tls_cert).read_bytes() if s.temporal_tls_cert else None,
        client_private_key=Path(s.temporal_tls_key).read_bytes() if s.temporal_tls_key else None,
    )


class TemporalUnreachable(RuntimeError):
    """No Temporal frontend answers at the configured address; the message says what to do."""


async def connect(
    s: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    interceptors: Sequence[Interceptor] = (),
) -> Client:
    """``runtime`` and ``interceptors``: the worker's telemetry (transcend/telemetry.py)."""
    s = s or settings()
    try:
        return await Client.connect(
            s.temporal_address,
            namespace=s.temporal_namespace,
            data_converter=data_converter(codec_keys(s)),
            tls=tls_config(s),
            runtime=runtime,
            interceptors=interceptors,
        )
    except RuntimeError as e:
        raise TemporalUnreachable(
            f"cannot reach Temporal at {s.temporal_address} ({e}); start the dev server "
            "(`transcend server`) or set TRANSCEND_TEMPORAL_ADDRESS"
        ) from e

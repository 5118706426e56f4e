"""Settings for the worker, the CLI and the activities.

Read from environment variables (``TRANSCEND_*``) and, when present, a TOML file
(``TRANSCEND_CONFIG`` or ``$TRANSCEND_HOME/transcend.toml``); the environment wins.
Embedded defaults: the dev server on localhost:7233, a SQLite catalog and state
under ``$TRANSCEND_HOME`` (default ``/var/lib/transcend``).
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path = Field(default=Path("/var/lib/transcend"))
    catalog_url: str = ""
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_tls_cert: str = ""
    temporal_tls_key: str = ""
    temporal_tls_ca: str = ""
    site: str = "local"
    secret_key_file: str = ""
    codec_key_file: str = ""
    metrics_port: int = 0  # worker's Prometheus endpoint; 0: off
    metrics_address: str = "127.0.0.1"
    otlp_endpoint: str = ""  # OTLP/HTTP collector base URL (http://host:4318); empty: off
    # Alerts (transcend/alerts.py): webhook URLs that receive every alert as JSON, and
    # the HMAC-SHA256 key that signs them (empty: unsigned).
    alert_webhooks: list[str] = Field(default_factory=list)
    alert_webhook_secret: str = ""
    # NBD between sites (docs/sites.md). site_address: the host name or IP address other
    # sites dial to reach this site's NBD exports (staging layers in "push" transfers,
    # frozen disks in "pull" transfers);
    # empty: this site exports only on unix sockets, i.e. to workers on its own host.
    site_address: str = ""
    # TCP ports this site's worker may listen on for those exports (one per disk of a
    # running cycle); the site's firewall must let the other sites reach them.
    nbd_port_min: int = Field(default=10810, ge=1, le=65535)
    nbd_port_max: int = Field(default=10999, ge=1, le=65535)
    # This site's x509 bundle (transcend/pki.py layout: ca-cert.pem, server-*.pem,
    # client-*.pem). Empty: <pki_dir>/sites/<site>, where `transcend ca issue` puts it.
    nbd_tls_dir: str = ""
    # How sites authenticate NBD over TLS: "x509" (certificates from `transcend ca
    # issue`) or "psk" (a pre-shared key: keys.psk in the same directory, the same
    # identity and key at every site that talks to this one).
    nbd_tls: Literal["x509", "psk"] = "x509"
    # A copy whose counters do not move for this long is cancelled and retried from its
    # durable offset (a cut link otherwise stalls until TCP gives up, ~15 minutes).
    stream_stall_seconds: int = Field(default=60, ge=5)

    @field_validator("alert_webhooks", mode="before")
    @classmethod
    def _webhook_list(cls, v: object) -> object:
        """The environment gives one comma-separated string; TOML a list or that string."""
        if isinstance(v, str):
            v = [u.strip() for u in v.split(",") if u.strip()]
        if isinstance(v, list):
            for url in v:
                if isinstance(url, str) and not url.startswith(("http://", "https://")):
                    raise ValueError(
                        f"alert webhook {url!r} is not an http:// or https:// URL; set "
                        "alert_webhooks (TRANSCEND_ALERT_WEBHOOKS) to comma-separated URLs")
        return v

    @model_validator(mode="after")
    def _port_range(self) -> Settings:
        if self.nbd_port_min > self.nbd_port_max:
            raise ValueError(
                f"nbd_port_min {self.nbd_port_min} is above nbd_port_max {self.nbd_port_max}; "
                "set TRANSCEND_NBD_PORT_MIN/TRANSCEND_NBD_PORT_MAX to a range such as 10810-10999")
        return self

    @property
    def effective_catalog_url(self) -> str:
        return self.catalog_url or f"sqlite:///{self.home / 'catalog.sqlite'}"

    @property
    def task_queue(self) -> str:
        return site_task_queue(self.site)

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def pki_dir(self) -> Path:
        """The CA and per-site certificates for NBD over TLS (transcend/pki.py)."""
        return self.home / "pki"

    @property
    def site_tls_dir(self) -> Path:
        """This site's own certificates for NBD over TLS: ``nbd_tls_dir`` or
        ``<pki_dir>/sites/<site>`` (served by qemu-nbd, presented by libnbd clients)."""
        return Path(self.nbd_tls_dir) if self.nbd_tls_dir else self.pki_dir / "sites" / self.site


def site_task_queue(site: str) -> str:
    """Each site's worker listens on its own queue so activities run next to their data."""
    return f"transcend-{site}"


_ENV = {
    "home": "TRANSCEND_HOME",
    "catalog_url": "TRANSCEND_CATALOG_URL",
    "temporal_address": "TRANSCEND_TEMPORAL_ADDRESS",
    "temporal_namespace": "TRANSCEND_TEMPORAL_NAMESPACE",
    "temporal_tls_cert": "TRANSCEND_TEMPORAL_TLS_CERT",
    "temporal_tls_key": "TRANSCEND_TEMPORAL_TLS_KEY",
    "temporal_tls_ca": "TRANSCEND_TEMPORAL_TLS_CA",
    "site": "TRANSCEND_SITE",
    "secret_key_file": "TRANSCEND_SECRET_KEY_FILE",
    "codec_key_file": "TRANSCEND_CODEC_KEY_FILE",
    "metrics_port": "TRANSCEND_METRICS_PORT",
    "metrics_address": "TRANSCEND_METRICS_ADDRESS",
    "otlp_endpoint": "TRANSCEND_OTLP_ENDPOINT",
    "alert_webhooks": "TRANSCEND_ALERT_WEBHOOKS",
    "alert_webhook_secret": "TRANSCEND_ALERT_WEBHOOK_SECRET",
    "site_address": "TRANSCEND_SITE_ADDRESS",
    "nbd_port_min": "TRANSCEND_NBD_PORT_MIN",
    "nbd_port_max": "TRANSCEND_NBD_PORT_MAX",
    "nbd_tls_dir": "TRANSCEND_NBD_TLS_DIR",
    "nbd_tls": "TRANSCEND_NBD_TLS",
    "stream_stall_seconds": "TRANSCEND_STREAM_STALL_SECONDS",
}


def load_settings(config_file: str | None = None) -> Settings:
    values: dict[str, object] = {}
    home = os.environ.get("TRANSCEND_HOME", "/var/lib/transcend")
    path = Path(config_file or os.environ.get("TRANSCEND_CONFIG") or Path(home) / "transcend.toml")
    if path.is_file():
        with path.open("rb") as f:
            values.update(tomllib.load(f))
    for field, env in _ENV.items():
        if env in os.environ:
            values[field] = os.environ[env]
    return Settings.model_validate(values)


@lru_cache(maxsize=1)
def settings() -> Settings:
    """Process-wide settings (tests call ``settings.cache_clear()`` after changing env)."""
    return load_settings()

"""Where a vSphere disk's bytes are on this worker, for the ``file`` writer (tests, and
datastores mounted on the worker): the descriptor's datastore path through the
platform's ``datastore_mounts``, then the descriptor's first extent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from connectors.base import PermanentError
from connectors.vmware.session import split_datastore_path
from connectors.vmware.vmdk import parse_descriptor


def config_map(config: dict[str, Any], key: str, platform: str) -> dict[str, str]:
    """A mapping from the config: a dict, or JSON text (``--config 'k={"a": "b"}'``)."""
    raw = config.get(key) or {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise PermanentError(f"platform {platform!r}: config {key} is not a JSON "
                                 f"object: {e}") from e
    if not isinstance(raw, dict):
        raise PermanentError(f"platform {platform!r}: config {key} must map names to names")
    return {str(k): str(v) for k, v in raw.items()}


def data_file(mounts: dict[str, str], descriptor: str) -> Path:
    """The data file of the disk whose descriptor is ``descriptor`` ("[ds] vm/d.vmdk")."""
    ds, path = split_datastore_path(descriptor)
    if ds not in mounts:
        raise PermanentError(f"writer 'file' needs datastore_mounts[{ds!r}] (where the "
                             "datastore is mounted on this worker)")
    desc_path = Path(mounts[ds]) / path
    desc = parse_descriptor(desc_path.read_text(errors="replace"), str(desc_path))
    return desc_path.parent / desc.extents[0].file

"""The platform config a KVM/libvirt platform accepts (``transcend platform add --config``),
checked before it is saved: a misspelt key or a malformed libvirt URI is refused with
what is allowed, instead of being ignored until a cycle fails."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# driver[+transport]://[user@][host][:port]/path[?params] (libvirt.org/uri.html)
_LIBVIRT_URI = re.compile(r"^[a-z][a-z0-9]*(\+[a-z0-9]+)?://[^\s/?#]*/[^\s?#]*(\?\S*)?$")


class KvmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str = Field(default="qemu:///system", description="libvirt URI of the host")
    work_dir: str = Field(default="", description="source: backup scratch files "
                                                  "(default $TRANSCEND_HOME/kvm-source)")
    root: str = Field(default="", description="target: the directory that holds the replicas")
    domain_type: Literal["qemu", "kvm"] = Field(default="qemu", description="target: qemu "
                                                "(TCG) or kvm for booted points")
    run_dir: str = Field(default="", description="target: qemu-nbd sockets, pid files, logs "
                                                 "(default <root>/.run)")
    min_free_bytes: int = Field(default=256 << 20, ge=0, description="target: refuse a cycle "
                                "below this much free space")
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] = Field(
        default="none", description="target: qemu-nbd cache mode for exports")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not _LIBVIRT_URI.match(v):
            raise ValueError(f"{v!r} is not a libvirt URI (driver[+transport]://[host]/path, "
                             "e.g. qemu:///system or qemu+ssh://root@host/system)")
        return v

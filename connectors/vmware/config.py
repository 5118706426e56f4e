"""The platform config a VMware vSphere platform accepts (``transcend platform add
--config``), checked before it is saved; the connector reads the same keys
(docs/platforms/vmware.md lists what each does)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class VmwareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1, description="vCenter or ESXi host name or address")
    port: int = Field(default=443, ge=1, le=65535)
    thumbprint: str = Field(default="", description="the server certificate's SHA-1 "
                            "thumbprint (one of thumbprint, ca_file, insecure)")
    ca_file: str = Field(default="", description="PEM CA bundle for the server certificate")
    insecure: bool = Field(default=False, description="no certificate check (labs only)")
    vddk_libdir: str = Field(default="", description="VDDK's directory: read and write "
                             "through nbdkit-vddk instead of the datastore endpoint")
    vddk_transports: str = Field(default="nbdssl:nbd", description="VDDK transport modes")
    vddk_config: str = Field(default="", description="VDDK config file")
    datacenter: str = Field(default="", description="target: datacenter (default: the only one)")
    cluster: str = Field(default="", description="target: cluster for replica VMs")
    host_name: str = Field(default="", description="target: ESXi host for replica VMs")
    datastore: str = Field(default="", description="target: datastore for replica disks")
    folder: str = Field(default="", description="target: VM folder for replica VMs")
    replica_prefix: str = Field(default="transcend-replica-", description="target: replica VM "
                                "name prefix")
    writer: Literal["vddk", "file"] = Field(default="vddk", description="target: how "
                                                 "staged disks are written")
    test_network: str = Field(default="", description="target: port group for test failovers")
    network_map: dict[str, str] | str = Field(default_factory=dict, description="target: "
                                              "source network -> port group (JSON)")
    datastore_mounts: dict[str, str] | str = Field(default_factory=dict, description="target: "
                                                   "datastore -> local mount (JSON)")

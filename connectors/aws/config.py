"""The platform config an AWS platform accepts (``transcend platform add --config``),
checked before it is saved; the connector reads the same keys (docs/platforms/aws.md).

Credentials are the platform's secret (``--secret access_key_id=… --secret
secret_access_key=…``, optionally ``session_token``), encrypted in the catalog; without
them boto3's default chain is used (instance profile, environment, ``profile``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AwsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    region: str = Field(min_length=1, description="the region (us-east-1); one platform per "
                        "account and region")
    endpoint_url: str = Field(default="", description="EC2 endpoint override (tests, VPC "
                              "endpoints); empty: AWS's own")
    ebs_endpoint_url: str = Field(default="", description="EBS direct endpoint override; "
                                  "empty: endpoint_url, else AWS's own")
    profile: str = Field(default="", description="a named profile of the worker's AWS config "
                         "(instead of keys in the secret)")
    role_arn: str = Field(default="", description="a role to assume for every call")
    external_id: str = Field(default="", description="the external id the role's trust "
                             "policy asks for")
    work_dir: str = Field(default="", description="where the worker keeps journals of "
                          "staged snapshots (default: <TRANSCEND_HOME>/aws/<platform>)")
    max_attempts: int = Field(default=10, ge=1, le=50, description="botocore retry attempts "
                              "per call (throttling and 5xx; standard mode)")
    connections: int = Field(default=16, ge=1, le=256, description="EBS direct requests in "
                             "flight per disk")
    # target
    staging_timeout_minutes: int = Field(default=4320, ge=10, le=4320, description="how long "
                                         "a staged snapshot may stay pending (StartSnapshot "
                                         "Timeout)")
    kms_key_arn: str = Field(default="", description="target: KMS key of the first point's "
                             "snapshot (encrypted replicas; later points inherit it)")
    encrypted: bool = Field(default=False, description="target: encrypt the first point's "
                            "snapshot with the account's default EBS key")
    subnet: str = Field(default="", description="target: subnet for failover instances")
    test_subnet: str = Field(default="", description="target: isolated subnet for test "
                             "failovers (required to test-fail-over; never guessed)")
    security_groups: list[str] | str = Field(default_factory=list, description="target: "
                                             "security groups of failover instances")
    test_security_groups: list[str] | str = Field(default_factory=list, description="target: "
                                                  "security groups of test instances")
    instance_type: str = Field(default="", description="target: instance type of recovered "
                               "VMs (default: the smallest general-purpose type that fits "
                               "the source's CPUs and memory)")
    volume_type: str = Field(default="gp3", description="target: EBS type of recovered "
                             "volumes")

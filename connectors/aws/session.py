"""boto3 clients for one AWS platform: credentials, endpoints, retries.

Retries are botocore's (``standard`` mode: throttling errors and 5xx with
exponential back-off and jitter), never a loop of ours; ``max_attempts`` comes from
the platform config. The same parameters travel, as a plain dict, to nbdkit's
embedded interpreter, which builds its own EBS client from them
(``ebs_blocks.client_from_params``): credentials in that dict go only to the
export's 0600 config file.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from connectors.aws import ebs_blocks
from connectors.aws.config import AwsConfig
from connectors.base import ConnectorError, NotFound, PermanentError
from transcend.models import PlatformInfo

#: Error codes retrying cannot fix: the operator must change credentials or config.
AUTH_CODES = frozenset({
    "AuthFailure", "UnauthorizedOperation", "AccessDeniedException", "AccessDenied",
    "InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
    "ExpiredToken", "ExpiredTokenException", "OptInRequired", "InvalidSignatureException",
})
QUOTA_CODES = frozenset({"SnapshotLimitExceeded", "ServiceQuotaExceededException",
                         "InstanceLimitExceeded", "VolumeLimitExceeded",
                         "ResourceLimitExceeded"})


class AwsSession:
    def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
        self.info = info
        try:
            self.config = AwsConfig.model_validate(info.config)
        except ValueError as e:
            raise PermanentError(f"platform {info.name!r}: {e}") from e
        self.region = self.config.region
        self.params = self._params(secret)
        self._ec2: Any = None
        self._ebs: Any = None

    def _params(self, secret: dict[str, str]) -> dict[str, Any]:
        """What any process needs to build clients: endpoints, retries, credentials (from
        the secret, or resolved now from a profile or an assumed role)."""
        c = self.config
        params: dict[str, Any] = {
            "region": c.region, "endpoint_url": c.endpoint_url,
            "ebs_endpoint_url": c.ebs_endpoint_url or c.endpoint_url,
            "max_attempts": c.max_attempts, "connections": c.connections,
            "access_key_id": secret.get("access_key_id", ""),
            "secret_access_key": secret.get("secret_access_key", ""),
            "session_token": secret.get("session_token", ""),
        }
        if c.profile or c.role_arn:
            params.update(self._resolve(params))
        return params

    def _resolve(self, params: dict[str, Any]) -> dict[str, str]:
        import boto3

        session = boto3.Session(profile_name=self.config.profile or None,
                                region_name=self.region)
        if not self.config.role_arn:
            creds = session.get_credentials()
            if creds is None:
                raise PermanentError(f"platform {self.info.name!r}: profile "
                                     f"{self.config.profile!r} has no credentials")
            frozen = creds.get_frozen_credentials()
            return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                    "session_token": frozen.token or ""}
        sts = session.client("sts", endpoint_url=self.config.endpoint_url or None,
                             **({"aws_access_key_id": params["access_key_id"],
                                 "aws_secret_access_key": params["secret_access_key"]}
                                if params["access_key_id"] else {}))
        kwargs: dict[str, Any] = {"RoleArn": self.config.role_arn,
                                  "RoleSessionName": f"transcend-{self.info.name}"[:64]}
        if self.config.external_id:
            kwargs["ExternalId"] = self.config.external_id
        try:
            creds = sts.assume_role(**kwargs)["Credentials"]
        except ClientError as e:
            raise translate(e, f"assuming role {self.config.role_arn}") from e
        return {"access_key_id": creds["AccessKeyId"], "secret_access_key": creds["SecretAccessKey"],
                "session_token": creds["SessionToken"]}

    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            self._ec2 = ebs_blocks.client_from_params(self.params, "ec2")
        return self._ec2

    @property
    def ebs(self) -> Any:
        if self._ebs is None:
            self._ebs = ebs_blocks.client_from_params(self.params, "ebs")
        return self._ebs

    def sts(self) -> Any:
        return ebs_blocks.client_from_params(self.params, "sts")

    def describe(self) -> list[str]:
        """ConnectivityCheck lines: who we are and that EC2 answers."""
        try:
            who = self.sts().get_caller_identity()
            n = sum(len(r["Instances"]) for page in
                    self.ec2.get_paginator("describe_instances").paginate()
                    for r in page["Reservations"])
        except (ClientError, BotoCoreError) as e:
            raise translate(e, f"reaching AWS in {self.region}") from e
        return [f"AWS account {who.get('Account', '?')} as {who.get('Arn', '?')}",
                f"EC2 in {self.region}: {n} instances"]


def error_code(e: BaseException) -> str:
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def translate(e: BaseException, doing: str) -> ConnectorError:
    """A boto error as the connector error that says what to do. Throttling and 5xx
    reach here only after botocore's retries ran out: retried by the activity."""
    code = error_code(e)
    msg = str(e)
    if isinstance(e, NoCredentialsError) or code in AUTH_CODES:
        return PermanentError(f"AWS refused the credentials while {doing} ({code or msg}): "
                              "check the platform's access keys, profile or role and its "
                              "IAM policy (docs/platforms/aws.md lists what it needs)")
    if code in QUOTA_CODES:
        return PermanentError(f"an AWS quota was reached while {doing} ({code}: {msg}): raise "
                              "the quota or remove old snapshots/instances, then retry")
    if code.endswith(".NotFound") or code in ("ResourceNotFoundException", "InvalidSnapshot.NotFound"):
        return NotFound(f"{doing}: {msg}")
    if code in ("ValidationException", "InvalidParameterValue", "InvalidParameter",
                "InvalidParameterCombination", "MissingParameter"):
        return PermanentError(f"AWS rejected a request while {doing}: {msg}")
    return ConnectorError(f"AWS call failed while {doing}: {msg}")

"""The one S3 write that must be atomic: an index created only where none exists.

tensorstore's s3 driver checks a write's condition with a request before the write, so two savers
can both pass the check. S3 (and MinIO, and other S3-compatible stores) evaluates `If-None-Match: *`
on the PUT itself; boto3 sends it. Of two savers, the second gets 412 Precondition Failed.
"""

from __future__ import annotations

from typing import Any, Mapping

from mimo_ckpt.errors import StorageError

__all__ = ["put_if_absent"]


def put_if_absent(spec: Mapping[str, Any], key: str, data: bytes, timeout_s: float) -> bool:
    """Create `key` under the spec's bucket and path; False when it exists already (and does not
    hold `data`: a retried PUT whose first attempt landed finds its own bytes)."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise StorageError("committing to s3:// needs boto3 for its conditional write "
                           "(pip install 'mimo-ckpt[s3]')") from None
    url = f"s3://{spec['bucket']}/{spec.get('path', '')}{key}"
    credentials = spec.get("aws_credentials") or {}
    session = boto3.session.Session(profile_name=credentials.get("profile")) \
        if credentials.get("type") == "profile" else boto3.session.Session()
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 3, "mode": "standard"})
    if credentials.get("type") == "anonymous":
        from botocore import UNSIGNED
        config = config.merge(Config(signature_version=UNSIGNED))
    client = session.client("s3", endpoint_url=spec.get("endpoint"), region_name=spec.get("aws_region"), config=config)
    bucket, name = spec["bucket"], f"{spec.get('path', '')}{key}"
    try:
        client.put_object(Bucket=bucket, Key=name, Body=data, IfNoneMatch="*")
        return True
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code not in ("PreconditionFailed", "ConditionalRequestConflict") and status not in (409, 412):
            raise StorageError(f"writing {url}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"writing {url}: {exc}") from exc
    try:
        held = client.get_object(Bucket=bucket, Key=name)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"reading {url} after a refused create: {exc}") from exc
    return held == data

"""URIs, S3 settings and the `URI[@version|@tag]` dataset reference.

A URI is a local path or `s3://bucket/prefix`. S3 endpoint and credentials
come from the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), so MinIO, AWS S3 and moto work alike.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from emoji_ldm.errors import UserError

_AWS_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ALLOW_HTTP",
)


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def normalize_uri(uri: str) -> str:
    """S3 URIs unchanged (no trailing slash); local paths made absolute."""
    if not uri or not uri.strip():
        raise UserError("the URI is empty: give a local path or s3://bucket/prefix")
    if "://" in uri and not is_s3(uri) and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise UserError(f"URI scheme {scheme!r} in {uri!r} is not supported: use a local path or s3://bucket/prefix")
    if is_s3(uri):
        rest = uri.split("://", 1)[1].strip("/")
        if not rest:
            raise UserError(f"S3 URI {uri!r} names no bucket: use s3://bucket/prefix")
        return "s3://" + rest
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return str(Path(uri).expanduser().resolve())


def storage_options() -> dict[str, str]:
    """delta-rs storage options from the environment (plain-HTTP endpoints allowed)."""
    opts = {k: os.environ[k] for k in _AWS_KEYS if os.environ.get(k)}
    if opts.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        opts.setdefault("AWS_ALLOW_HTTP", "true")
    if "AWS_REGION" not in opts and os.environ.get("AWS_DEFAULT_REGION"):
        opts["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"]
    return opts


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for `uri`."""
    uri = normalize_uri(uri)
    if is_s3(uri):
        opts = storage_options()
        fs = pafs.S3FileSystem(
            access_key=opts.get("AWS_ACCESS_KEY_ID"),
            secret_key=opts.get("AWS_SECRET_ACCESS_KEY"),
            session_token=opts.get("AWS_SESSION_TOKEN"),
            region=opts.get("AWS_REGION"),
            endpoint_override=opts.get("AWS_ENDPOINT_URL"),
        )
        return fs, uri[len("s3://"):]
    return pafs.LocalFileSystem(), uri


def s3_client():
    """A boto3 S3 client for the environment's endpoint and credentials, one per process and settings."""
    opts = storage_options()
    return _s3_client(opts.get("AWS_ENDPOINT_URL"), opts.get("AWS_REGION"), opts.get("AWS_ACCESS_KEY_ID"),
                      opts.get("AWS_SECRET_ACCESS_KEY"), opts.get("AWS_SESSION_TOKEN"))


@functools.lru_cache(maxsize=4)
def _s3_client(endpoint: str | None, region: str | None, key: str | None, secret: str | None,
               token: str | None):
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=key,
                                          aws_secret_access_key=secret, aws_session_token=token)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def check_s3_bucket(uri: str) -> None:
    """Fail early with a clear message when the bucket is missing or the credentials are wrong."""
    if not is_s3(uri):
        return
    import boto3
    import botocore.exceptions as bce

    bucket = normalize_uri(uri)[len("s3://"):].split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            config=__import__("botocore.config").config.Config(
                connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}
            ),
        )
        client.head_bucket(Bucket=bucket)
    except bce.NoCredentialsError:
        raise UserError(
            f"no S3 credentials for {uri!r}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except bce.EndpointConnectionError:
        raise UserError(
            f"cannot reach the S3 endpoint {endpoint or 'AWS default'} for {uri!r}: "
            "check AWS_ENDPOINT_URL and that the server is running"
        ) from None
    except bce.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise UserError(f"S3 bucket {bucket!r} does not exist (from {uri!r}): create it first") from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise UserError(
                f"S3 refused access to bucket {bucket!r} (HTTP {code}): check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and the bucket policy"
            ) from None
        raise UserError(f"S3 error for {uri!r}: {code} {e}") from None


_REF_SUFFIX = re.compile(r"^(?P<base>.+?)@(?P<ref>[A-Za-z0-9_.\-]+)$")


@dataclass(frozen=True)
class DatasetRef:
    """`URI`, `URI@3` or `URI@tagname`: a table and an optional version or tag."""

    uri: str
    version: int | None = None
    tag: str | None = None

    @classmethod
    def parse(cls, text: str) -> "DatasetRef":
        m = _REF_SUFFIX.match(text.strip()) if text else None
        if m and "/" not in m.group("ref"):
            ref = m.group("ref")
            if ref.isdigit():
                return cls(normalize_uri(m.group("base")), version=int(ref))
            return cls(normalize_uri(m.group("base")), tag=ref)
        return cls(normalize_uri(text))

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.uri}@{self.version}"
        if self.tag is not None:
            return f"{self.uri}@{self.tag}"
        return self.uri


# --- URIs recorded in lineage (model cards, commits, PNG text chunks) ----------------------

# query parameters that carry credentials in presigned URLs (AWS SigV4 and V2)
_SECRET_PARAMS = ("x-amz-credential", "x-amz-signature", "x-amz-security-token", "awsaccesskeyid", "signature")


def public_uri(uri: str) -> str:
    """`uri` as it may be stored or shown: never `user:password@`, never a presigned URL's keys.

    Local paths are returned as they are; `s3://` URIs lose any query; other URLs
    keep their query but the signature parameters.
    """
    if not uri or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    rest, _, query = rest.partition("?")
    host, slash, path = rest.partition("/")
    clean = f"{scheme}://{host.rsplit('@', 1)[-1]}{slash}{path}"
    if query and scheme.lower() not in ("s3", "s3a"):
        kept = [p for p in query.split("&") if p.split("=", 1)[0].lower() not in _SECRET_PARAMS]
        if kept:
            clean += "?" + "&".join(kept)
    return clean

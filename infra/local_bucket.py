"""Do on a local S3 server what the `minio-bucket` Job does in the cluster (k8s/base/minio.bucket-job.yaml):
create the `emoji-ldm` bucket, turn on versioning, upload the prompt list from the same ConfigMap.

    python infra/local_bucket.py      # S3 settings from the standard AWS variables (source .local/s3.env)
"""

import sys
from pathlib import Path

import boto3
import yaml

BUCKET = "emoji-ldm"
MANIFEST = Path(__file__).resolve().parent.parent / "k8s" / "base" / "minio.bucket-job.yaml"


def prompt_files() -> dict[str, str]:
    """The ConfigMap's files: name -> text (uploaded to s3://emoji-ldm/prompts/NAME)."""
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "emoji-ldm-prompts":
            return dict(doc["data"])
    raise SystemExit(f"{MANIFEST} has no ConfigMap emoji-ldm-prompts")


def main() -> int:
    s3 = boto3.client("s3")  # endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    for name, text in prompt_files().items():
        s3.put_object(Bucket=BUCKET, Key=f"prompts/{name}", Body=text.encode())
    print(f"bucket {BUCKET}: versioning on, prompts/{', prompts/'.join(prompt_files())} uploaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())

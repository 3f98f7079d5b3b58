"""URIs and dataset references."""

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.store.uri import DatasetRef, normalize_uri, storage_options


def test_dataset_ref_parsing(tmp_path):
    assert DatasetRef.parse("s3://b/p@3") == DatasetRef("s3://b/p", version=3)
    assert DatasetRef.parse("s3://b/p@golden") == DatasetRef("s3://b/p", tag="golden")
    assert DatasetRef.parse("s3://b/p/") == DatasetRef("s3://b/p")
    local = DatasetRef.parse(f"{tmp_path}/ds@2")
    assert local.uri == str(tmp_path / "ds") and local.version == 2
    assert str(DatasetRef("s3://b/p", tag="x")) == "s3://b/p@x"


@pytest.mark.parametrize("uri, text", [("", "empty"), ("gs://b/x", "scheme 'gs'"), ("s3://", "names no bucket")])
def test_bad_uris(uri, text):
    with pytest.raises(UserError, match=text):
        normalize_uri(uri)


def test_storage_options_allow_plain_http(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_ALLOW_HTTP", raising=False)
    assert storage_options()["AWS_ALLOW_HTTP"] == "true"

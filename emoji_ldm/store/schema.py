"""The emoji row schema (pyarrow only, so Ray workers import it cheaply)."""

import pyarrow as pa
import pyarrow.compute as pc

EMOJI_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # content hash of the stored pixels
        ("image", pa.binary()),  # PNG at the stored size: RGBA, or RGB in a table flattened with --background
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("orig_format", pa.string()),
        ("source", pa.string()),  # twemoji | dir:PATH | urls:FILE | crawl:<profile>/<tag>
        ("source_url", pa.string()),  # path or URL the bytes came from
        ("page_url", pa.string()),  # the web page the image was found on (crawls), else null
        ("title", pa.string()),
        ("tag", pa.string()),
        ("caption", pa.string()),
        ("caption_model", pa.string()),
        ("caption_prompt_id", pa.string()),  # which instruction produced the caption (captioning stage)
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)


def value_counts(values: pa.Array | pa.ChunkedArray) -> dict:
    """value -> how many times it occurs (nulls not counted), counted in Arrow."""
    counts = pc.value_counts(values.drop_null())
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))

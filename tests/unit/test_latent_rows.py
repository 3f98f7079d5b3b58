"""The encoder's output columns, built from its arrays without a Python object per row, read back as the
arrays they came from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from emoji_ldm.store.latents import LATENT_SCHEMA, decode_latents
from emoji_ldm.train.encode import _repeat_shape, rows_as_binary


def test_rows_round_trip_through_a_latent_file(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((5, 4, 8, 8)).astype(np.float16)  # (B, C, h, w)
    emb = rng.standard_normal((5, 16, 6)).astype(np.float16)[:, :, ::2]  # (B, L, D), not contiguous
    table = pa.Table.from_arrays([
        pa.array([f"id{i}" for i in range(5)]), pa.array(["c"] * 5), pa.array(["train"] * 5),
        rows_as_binary(latents), _repeat_shape(latents.shape[1:], 5),
        rows_as_binary(emb), _repeat_shape(emb.shape[1:], 5),
    ], schema=LATENT_SCHEMA)
    pq.write_table(table, tmp_path / "part.parquet")

    back = decode_latents(pq.read_table(tmp_path / "part.parquet").to_pydict())
    np.testing.assert_array_equal(back["latent"], latents)
    np.testing.assert_array_equal(back["text_emb"], emb)


def test_an_empty_batch_is_an_empty_column():
    assert len(rows_as_binary(np.zeros((0, 4, 8, 8), np.float16))) == 0
    assert len(_repeat_shape((4, 8, 8), 0)) == 0

"""Ingest: source items -> cleaned, de-duplicated emoji rows -> one new dataset version.

Input: a source spec (`twemoji`, `dir:PATH`, `urls:FILE`, `synthetic:N`; see
`emoji_ldm.sources`) or, for crawls, a Ray Dataset of items. Output: one new
version of the emoji Delta table (`emoji_ldm.store.schema.EMOJI_SCHEMA`) whose
commit records operation, source, counts, config and code version; rejected
inputs with their reasons in `_emoji_ldm/rejects/build-<id>.parquet`.

- `build.py`: `build_dataset(BuildConfig)` (`emoji-ldm dataset build`) and
  `ingest_dataset` (the crawler's way in), de-duplication;
- `tasks.py`: the Ray Data task code (fetch + clean one batch, the de-duplication rule);
- `sinks.py`: the sinks that write the build's uncommitted data files and rewrite
  those with duplicates.
Images are decoded and cleaned by `emoji_ldm.imaging.clean_image`.
"""

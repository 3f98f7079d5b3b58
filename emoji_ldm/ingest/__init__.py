"""Ingest: source items -> cleaned, de-duplicated emoji rows -> one new dataset version.

Input: a source spec (`twemoji`, `dir:PATH`, `urls:FILE`; see
`emoji_ldm.sources`) or, for crawls, a list of `SourceItem`s. Output: one new
version of the emoji Delta table (`emoji_ldm.store.schema.EMOJI_SCHEMA`) whose
commit records operation, source, counts, config and code version; rejected
inputs with their reasons in `_emoji_ldm/rejects/build-<id>.parquet`.

- `images.py`: `clean_image` (decode, bomb guard, composite, resize, hash) and
  `ImageConfig`;
- `tasks.py`: the Ray Data task code (fetch + clean one batch);
- `build.py`: `build_dataset(BuildConfig)` (`emoji-ldm dataset build`) and
  `ingest_items` (the crawler's way in).
"""

"""Storage: versioned Delta Lake tables and artifacts under a local path or an S3 URI.

Input: URIs (`/path`, `s3://bucket/prefix`, `URI@VERSION`, `URI@TAG`) and the
standard AWS variables for S3. Output: Delta versions whose commits carry
emoji-ldm metadata, and artifacts (models, cards, checkpoints) written so a
reader never sees a half-written one.

- `uri.py`: `normalize_uri`, `DatasetRef`, `filesystem`, `storage_options`;
- `delta.py`: `open_table`, `arrow_dataset` (driver-side reads that exit
  cleanly), `read_dataset` (Ray Data), `CommitDeltaDatasink` (one version per
  Ray Data write, Ray's public Datasink API), `append_rows`,
  `delete_matching`, `history`;
- `log.py`: Delta-log helpers (a version's data files, the commit that added
  a file, finding one row), for lineage and the caption pass;
- `ops.py`: versions, show, diff, tag, restore (the `emoji-ldm dataset` commands
  of `cli/dataset.py` print them); `sheet.py`: the contact sheet; `joins.py`:
  the ids two versions do not share (Ray Data anti-joins over changed files);
- `sidecar.py`: tags, the image mode and rejects beside a table;
- `artifacts.py`: `write_json`, `upload_dir`, `local_copy`, `check_writable`;
- `schema.py`: `EMOJI_SCHEMA`, the emoji row.

Only this package imports `deltalake` (ruff's TID251 enforces it).
"""

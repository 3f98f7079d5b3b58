"""`emoji-ldm lineage`: from an emoji, a set, a model or a table back to the data and code that made it.

    emoji-ldm lineage TARGET [--json] [--commits N]
        TARGET: a PNG, an emoji set folder or its manifest.json, a model URI (or a training --out),
        a table URI[@VERSION] (a dataset, a latent table or a bulk manifest)
    emoji-ldm lineage --row ID DATASET[@VERSION] [--json]

Why one command: each stage already records where its output came from, but
in its own place; an audit or a takedown needs the whole chain in one step.
The chain follows what each link names, nothing is guessed:

    PNG text chunks (`emoji_ldm.inference.pngmeta`): prompt, seed, settings, model URI + content id
      -> model_card.json: content id, preset, training config, steps, final loss,
         latent table + version
      -> the latent table version's encode commit: VAE, text encoder, dataset URI + version
      -> the dataset version's commits that made its rows, oldest first: builds
         (source, crawl profile/tag/pages, counts), caption passes (captioner,
         model, prompt id), restores (and the commits a restore undid).

A set's manifest.json and a bulk manifest's commits name the model the same way.
When a link cannot be followed (a PNG with its metadata stripped, a deleted
model or table, a vacuumed version, a model replaced since: its content id
differs) the chain is printed up to there, then `missing link: <which>: <why>`.
Exit codes: 0 the chain is complete; 1 a link is missing; 2 the TARGET itself
is wrong (no such file, not a PNG/set/model/table, an unknown version, a row
that is not in the version).

URIs: what newer code records is absolute (local paths resolved when
written, S3 URIs without credentials). Older cards and commits stored paths
as typed; a relative one is resolved against the folder holding the record
and each folder above it (`store.uri.resolve_recorded`), and the latent
table's dataset comes from its encode commit's `source`, always absolute.

`--row ID`: where one row of a dataset version came from, for a takedown.
Nothing records a row's arrival directly; what is recorded is which commit
added each data file (the Delta log's add actions, one snapshot per version),
what each commit was (commitInfo), and the row's own columns (source,
source_url, caption, caption_model, caption_prompt_id). So:
  1. the row: the version's `id` column streams through Arrow (one narrow
     column, constant memory, stopping at the first file that has it); from
     that file only the row group holding it is read, without the image;
  2. the commit that added that file: a binary search over versions for the
     first snapshot whose add actions list it (O(log versions) snapshots,
     each O(files), never a row);
  3. a caption pass (or any commit that rewrites files) adds a new file for
     rows that were already there, so if the row is in one of the files that
     commit removed (read at the version before, those files only), it is
     followed there and the commit is listed as a rewrite; a restore is
     followed to the version it restored. The first commit whose file holds
     the row and before which it was nowhere is the version it arrived in:
     a build (or crawl) whose commit records the source.
Cost: one scan of the `id` column of the version asked for, then only the
files each rewrite replaced, and O(log versions) log snapshots per step.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from emoji_ldm.errors import UserError
from emoji_ldm.options import opt


@dataclass(frozen=True)
class LineageConfig:
    target: str = opt(positional=True, help="a PNG, an emoji set folder or its manifest.json, a model URI "
                                            "(or a training --out), or a table URI[@VERSION]; with --row, "
                                            "the dataset URI[@VERSION]")
    row: str | None = opt(None, help="a row id (the `id` column, a content hash): the version it arrived in, "
                                     "its source, captioner and caption")
    as_json: bool = opt(False, flag="json", help="print one JSON document instead of text")
    commits: int = opt(1000, help="list at most N commits of the dataset version (the newest N up to it)")

    def __post_init__(self):
        if self.commits < 1:
            raise UserError(f"--commits must be 1 or more, got {self.commits}")
        if self.row is not None and not self.row.strip():
            raise UserError("--row is empty: give a row id (the `id` column of the dataset)")


class MissingLink(Exception):
    """A link of the chain that cannot be followed; `partial` is what was read of it, if anything."""

    def __init__(self, link: str, reason: str, partial: dict | None = None):
        super().__init__(f"{link}: {reason}")
        self.link, self.reason, self.partial = link, reason, partial


# --- following the chain ---------------------------------------------------------


def trace(target: str, commits: int = 1000) -> dict:
    """The chain from `target` as far as it is recorded: {"target", "chain": [link, ...], "complete", "missing"}.

    Each link is a dict with `link` (png | set | bulk_manifest | model | latent_table | dataset) and what
    that record says. A UserError means the target itself is wrong; a missing link ends the chain."""
    step = _first_step(target.strip())
    chain, missing = [], None
    while step is not None:
        follow, kwargs = step
        if follow is _dataset:  # the last link: how many of its commits to list
            kwargs = {**kwargs, "commits": commits}
        try:
            link, step = follow(**kwargs)
        except MissingLink as e:
            if e.partial:
                chain.append(e.partial)
            missing = {"link": e.link, "reason": e.reason}
            break
        except (UserError, OSError) as e:  # a record that cannot be read (gone, unreachable): the chain stops
            if not chain:  # ... unless it is the target itself: that is the user's to fix (exit 2)
                raise e if isinstance(e, UserError) else UserError(f"cannot read {target!r}: {e}") from None
            missing = {"link": follow.__name__.strip("_").replace("_", " "), "reason": str(e).splitlines()[0]}
            break
        chain.append(link)
    return {"target": target, "chain": chain, "complete": missing is None, "missing": missing}


def _first_step(target: str):
    from emoji_ldm.store.artifacts import exists
    from emoji_ldm.store.delta import commit_metadata, open_table, table_exists
    from emoji_ldm.store.uri import DatasetRef, join, normalize_uri

    if not target:
        raise UserError("the lineage TARGET is empty: give a PNG, a set folder, a model or a table URI")
    if target.lower().endswith((".png", "manifest.json")):  # before URI@VERSION: a file name may hold an @
        uri = normalize_uri(target)
        if not exists(uri):
            raise UserError(f"no file at {uri!r}: give the path or s3:// URI of a PNG or a set's manifest.json")
        return (_png, {"uri": uri}) if uri.lower().endswith(".png") else (_set, {"uri": uri})
    ref = DatasetRef.parse(target)
    uri = ref.uri
    if ref.version is None and ref.tag is None:
        if not table_exists(uri):
            if exists(join(uri, "manifest.json")):
                return _set, {"uri": join(uri, "manifest.json")}
            if any(exists(join(uri, *p)) for p in (("model_index.json",), ("model_card.json",),
                                                    ("model", "model_index.json"), ("model", "model_card.json"))):
                return _model, {"uri": uri}
    if table_exists(uri):
        table = open_table(ref)  # a clear error for an unknown version or tag
        operation = commit_metadata(table).get("operation")
        if operation == "encode":
            return _latent_table, {"uri": uri, "version": table.version()}
        if operation == "bulk-generate":
            return _bulk_manifest, {"uri": uri, "version": table.version()}
        return _dataset, {"uri": uri, "version": table.version()}
    raise UserError(f"{target!r} is not a PNG, an emoji set (folder or manifest.json), a model folder or a Delta "
                    "table: give one of those (a table as URI or URI@VERSION)")


def _png(uri: str):
    import io

    from PIL import Image, UnidentifiedImageError

    from emoji_ldm.inference.pngmeta import read_params
    from emoji_ldm.store.artifacts import read_bytes

    try:
        image = Image.open(io.BytesIO(read_bytes(uri)))
        text = dict(getattr(image, "text", {}) or {})  # reads the text chunks after the image data too
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{uri!r} is not a readable PNG file") from None
    params = read_params(text)
    link = {"link": "png", "uri": uri, **params}
    if "model" not in params:
        raise MissingLink("png -> model", f"{uri} carries no emoji-ldm generation parameters (no `model` text chunk): "
                                          "its metadata was stripped, it was written with --no-png-metadata, or "
                                          "another program wrote it", partial=link)
    return link, (_model, {"uri": params["model"], "content_id": params.get("model_content_id"),
                           "base": uri.rsplit("/", 1)[0]})


def _set(uri: str):
    from emoji_ldm.store.artifacts import read_json

    manifest = read_json(uri)
    model = manifest.get("model") or {}
    link = {"link": "set", "uri": uri, "id": manifest.get("id"), "theme": manifest.get("theme"),
            "items": len(manifest.get("items") or []), "settings": manifest.get("settings")}
    if not model.get("uri"):
        raise MissingLink("set -> model", f"{uri} names no model (`model.uri`)", partial=link)
    return link, (_model, {"uri": model["uri"], "content_id": model.get("content_id"), "base": uri.rsplit("/", 1)[0]})


def _bulk_manifest(uri: str, version: int):
    from emoji_ldm.store.delta import commit_metadata, open_table
    from emoji_ldm.store.uri import DatasetRef

    meta = commit_metadata(open_table(DatasetRef(uri, version=version)))
    link = {"link": "bulk_manifest", "uri": uri, "version": version, "prompts": meta.get("source"),
            "code_version": meta.get("code_version")}
    if not meta.get("model"):
        raise MissingLink("bulk manifest -> model", f"the commit of {uri}@{version} names no model", partial=link)
    return link, (_model, {"uri": meta["model"], "content_id": meta.get("model_content_id"), "base": uri})


def _model(uri: str, content_id: str | None = None, base: str | None = None):
    from emoji_ldm.store.artifacts import exists, read_json
    from emoji_ldm.store.delta import table_exists
    from emoji_ldm.store.uri import join, resolve_recorded

    resolved = resolve_recorded(uri, base or uri, lambda u: exists(u)) or uri
    card_uri = next((c for c in (join(resolved, "model_card.json"), join(resolved, "model", "model_card.json"))
                     if exists(c)), None)
    if card_uri is None:
        raise MissingLink("model", f"no model card (model_card.json) at {resolved}: the model was deleted or moved")
    card = read_json(card_uri)
    folder = card_uri.rsplit("/", 1)[0]
    training, metrics = card.get("training") or {}, card.get("metrics") or {}
    link = {"link": "model", "uri": folder, "content_id": card.get("content_id"), "preset": card.get("preset"),
            "steps": training.get("steps"), "final_loss": metrics.get("loss"), "training": training,
            "train_config": (card.get("config") or {}).get("train"), "vae": card.get("vae"),
            "text_encoder": card.get("text_encoder"), "code_version": card.get("code_version")}
    if content_id and card.get("content_id") and content_id != card["content_id"]:
        raise MissingLink("model", f"the image was made by the model with content id {content_id}; the model now at "
                                   f"{folder} has {card['content_id']}: it was replaced since", partial=link)
    if content_id and not card.get("content_id"):
        link["note"] = "the card records no content id (exported before content ids): not checked against the image"
    recorded = card.get("latent_table")
    if not recorded:
        raise MissingLink("model -> latent table", f"the card at {card_uri} names no latent table", partial=link)
    latent = resolve_recorded(recorded, folder, table_exists)
    if latent is None:
        raise MissingLink("latent table", f"the card records {recorded!r}, which is no table (relative paths are "
                                          f"tried against {folder} and the folders above it)", partial=link)
    return link, (_latent_table, {"uri": latent, "version": card.get("latent_table_version")})


def _latent_table(uri: str, version: int | None):
    from emoji_ldm.store.delta import commit_metadata, open_table, table_exists
    from emoji_ldm.store.latents import encoded_dataset
    from emoji_ldm.store.uri import DatasetRef, resolve_recorded

    try:
        table = open_table(DatasetRef(uri, version=version))
    except UserError as e:
        raise MissingLink("latent table", str(e)) from None
    meta = commit_metadata(table)
    if meta.get("operation") != "encode":
        raise MissingLink("latent table", f"{uri}@{table.version()} was not written by `emoji-ldm encode` "
                                          f"(its commit says {meta.get('operation')!r})")
    link = {"link": "latent_table", "uri": uri, "version": table.version(),
            "preset": (meta.get("preset") or {}).get("name"), "vae": meta.get("vae"),
            "text_encoder": meta.get("text_encoder"), "code_version": meta.get("code_version")}
    recorded, dataset_version = encoded_dataset(meta), meta.get("dataset_version")
    dataset = resolve_recorded(recorded, uri, table_exists) if recorded else None
    if dataset is None or dataset_version is None:
        raise MissingLink("latent table -> dataset", f"the encode commit of {uri}@{table.version()} names no dataset "
                                                     f"that can be found (it records {recorded!r})", partial=link)
    return link, (_dataset, {"uri": dataset, "version": dataset_version})


def _dataset(uri: str, version: int, commits: int = 1000):
    from emoji_ldm.store.delta import history, open_table, row_count
    from emoji_ldm.store.uri import DatasetRef

    try:
        table = open_table(DatasetRef(uri, version=version))
    except UserError as e:
        raise MissingLink("dataset", str(e)) from None
    latest = open_table(DatasetRef(uri)).version()
    rows = [r for r in history(uri, limit=latest - version + commits) if r["version"] <= version]
    link = {"link": "dataset", "uri": uri, "version": version, "rows": row_count(table),
            "commits": made_rows(rows)}
    if rows and rows[0]["version"] > 0:
        link["earlier_commits"] = rows[0]["version"]  # not listed: --commits, or the log no longer holds them
    return link, None


def made_rows(rows: list[dict]) -> list[dict]:
    """Commit summaries (oldest first) of the history up to a version; commits that a later restore undid
    carry `undone_by` (the restore's version): their rows are not in the version."""
    out, restore_to, restore_at = [], None, None
    for row in sorted(rows, key=lambda r: -r["version"]):
        summary = commit_summary(row)
        if restore_to is not None and row["version"] > restore_to:
            summary["undone_by"] = restore_at
        elif summary.get("restored_version") is not None:
            restore_to, restore_at = summary["restored_version"], row["version"]
        out.append(summary)
    return out[::-1]


def commit_summary(row: dict) -> dict:
    """What one commit of a dataset did, from its commitInfo (`store.delta.history` row)."""
    from emoji_ldm.store.uri import public_uri

    meta, counts = row["meta"], row["meta"].get("counts") or {}
    out = {"version": row["version"], "time": row["time"].strftime("%Y-%m-%d %H:%M:%S"),
           "operation": row["operation"]}
    if row["operation"] == "build":
        rejected = counts.get("rejected")
        out.update(source=public_uri(meta.get("source") or ""), build_id=meta.get("build_id"),
                   images_in=counts.get("in"), added=counts.get("added"),
                   rejected=sum(rejected.values()) if isinstance(rejected, dict) else rejected)
        if meta.get("crawl"):
            crawl = meta["crawl"]
            out["crawl"] = {k: crawl.get(k) for k in ("profile", "tag", "pages")}
    elif row["operation"] == "caption":
        out.update(captioner=meta.get("captioner"), caption_model=meta.get("caption_model"),
                   caption_prompt_id=meta.get("caption_prompt_id"), captioned=counts.get("captioned"))
    elif row["operation"] == "restore":
        out["restored_version"] = meta.get("restored_version")
    if not meta:
        out["note"] = "no emoji-ldm metadata (written by another tool)"
    for key in ("message", "code_version"):
        if meta.get(key):
            out[key] = meta[key]
    return out


# --- one row ------------------------------------------------------------------------

_ROW_COLUMNS = ("id", "source", "source_url", "page_url", "title", "tag", "caption", "caption_model",
                "caption_prompt_id", "ingested_at", "width", "height")


def _table_at(uri: str, version: int):
    """The table at `version`, or None when that version can no longer be loaded (vacuumed, log cleaned)."""
    from deltalake import DeltaTable

    from emoji_ldm.store.uri import storage_options

    try:
        return DeltaTable(uri, version=version, storage_options=storage_options() or None)
    except Exception:  # delta-rs raises a generic error for a version whose log is gone
        return None


def _files(table):
    """The data files of the table's loaded version, an Arrow column (the log's add actions: no data read)."""
    import pyarrow as pa

    return pa.table(table.get_add_actions(flatten=True)).column("path")


def _has_file(table, path: str) -> bool:
    import pyarrow.compute as pc

    return bool(pc.any(pc.equal(_files(table), path)).as_py())


def _removed_files(older, newer) -> set[str]:
    """The files of `older` that `newer` no longer has: Arrow set difference, only the removed paths in Python."""
    import pyarrow.compute as pc

    before = _files(older)
    return set(pc.filter(before, pc.invert(pc.is_in(before, value_set=_files(newer)))).to_pylist())


def find_row(table, row_id: str, only: set[str] | None = None) -> tuple[str, dict] | None:
    """(data file, row without its image) of `row_id` at the table's loaded version, or None.

    The `id` column streams through Arrow, file by file, until a batch holds the id (the files `only`,
    when given); from that file only the row group holding it is read. A pyarrow filter expression is
    not used: delta-rs writes string columns as string_view, which a string literal cannot compare with.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    data = table.to_pyarrow_dataset()
    fragments = [f for f in data.get_fragments() if only is None or f.path in only]
    if not fragments:
        return None
    data = pds.FileSystemDataset(fragments, data.schema, data.format, data.filesystem)
    hit = next((t.fragment for t in data.scanner(columns=["id"]).scan_batches()
                if pc.index(t.record_batch.column(0), row_id).as_py() >= 0), None)
    if hit is None:
        return None
    columns = [c for c in _ROW_COLUMNS if c in data.schema.names]
    for group in hit.split_by_row_group():
        i = pc.index(group.to_table(schema=data.schema, columns=["id"]).column("id"), row_id).as_py()
        if i >= 0:
            return hit.path, group.to_table(schema=data.schema, columns=columns).slice(i, 1).to_pylist()[0]
    return None


def _added_in(uri: str, path: str, upper: int) -> tuple[int, bool]:
    """The version (<= upper) whose commit added data file `path`, by binary search over snapshots; and whether
    a version that could not be loaded was met (the file may then be older than the answer)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lo, hi, gone = -1, upper, False  # invariant: the file is in `hi`, and not in `lo` (-1: before the table)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        table = _table_at(uri, mid)
        gone = gone or table is None
        paths = pa.table(table.get_add_actions(flatten=True)).column("path") if table is not None else None
        if paths is not None and pc.any(pc.equal(paths, path)).as_py():
            hi = mid
        else:
            lo = mid
    return hi, gone


class _Log:
    """Commit summaries by version, read from the newest back to the oldest asked for (never the whole log
    unless asked for version 0)."""

    def __init__(self, uri: str, latest: int):
        self.uri, self.latest, self.rows = uri, latest, {}

    def commit(self, version: int) -> dict:
        from emoji_ldm.store.delta import history

        if version not in self.rows:
            self.rows.update({r["version"]: r for r in history(self.uri, limit=self.latest - version + 1)})
        row = self.rows.get(version)
        return commit_summary(row) if row else {"version": version, "operation": "?",
                                                "note": "the log no longer holds this commit"}


def row_origin(dataset: str, row_id: str) -> dict:
    """Where row `row_id` of a dataset version came from: the version it arrived in (with its commit), the
    commits that rewrote its file since (caption passes, restores), and its source and caption columns."""
    from emoji_ldm.store.delta import open_table
    from emoji_ldm.store.uri import DatasetRef, public_uri

    ref = DatasetRef.parse(dataset)
    table = open_table(ref)
    version = table.version()
    found = find_row(table, row_id)
    if found is None:
        raise UserError(f"row {row_id!r} is not in {ref.uri}@{version}: give a row id (the `id` column, a content "
                        "hash) of that version, e.g. from `emoji-ldm dataset diff`")
    path, row = found
    current, seen = path, row  # the file at the version asked for; the row as the current step sees it
    log = _Log(ref.uri, open_table(DatasetRef(ref.uri)).version())
    changes, at, note = [], version, None
    while True:
        added, gone = _added_in(ref.uri, path, at)
        commit = log.commit(added)
        restored = commit.get("restored_version")
        older = _table_at(ref.uri, restored if restored is not None else added - 1) if added > 0 else None
        if gone or (added > 0 and older is None):
            note = "older versions can no longer be loaded (vacuumed or log cleaned): it may have arrived earlier"
        if older is None:
            break
        if restored is not None and _has_file(older, path):  # the restore brought this very file back
            changes.append(commit)
            at = restored
            continue
        only = None if restored is not None else _removed_files(older, _table_at(ref.uri, added))
        before = find_row(older, row_id, only) if only is None or only else None
        if before is None:  # nowhere before this commit: it arrived here
            break
        changes.append({**commit, "caption_changed": before[1].get("caption") != seen.get("caption")})
        (path, seen), at = before, older.version()
    row = {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}
    for key in ("source", "source_url", "page_url"):
        if row.get(key):
            row[key] = public_uri(row[key])
    caption_pass = next((c for c in changes if c.get("caption_changed")), None)  # the newest that set it
    return {"row": row_id, "dataset": ref.uri, "version": version, "file": current, "arrived": commit,
            "rewritten_by": changes, "caption_pass": caption_pass, "values": row, "note": note}


# --- the command ----------------------------------------------------------------------


def lineage_command(config: LineageConfig) -> int:
    """Print the lineage (text or --json); the exit code: 0 complete, 1 a missing link (2 is a UserError)."""
    if config.row is not None:
        result = row_origin(config.target, config.row.strip())
        print(json.dumps(result, indent=2, default=str) if config.as_json else format_row(result))
        return 0
    result = trace(config.target, commits=config.commits)
    print(json.dumps(result, indent=2, default=str) if config.as_json else format_chain(result))
    return 0 if result["complete"] else 1


def _settings_text(p: dict) -> str:
    parts = [f"seed {p['seed']}" if "seed" in p else None, f"{p['steps']} steps" if "steps" in p else None,
             f"guidance {p['guidance']:g}" if "guidance" in p else None, p.get("scheduler"), p.get("size")]
    return ", ".join(x for x in parts if x)


def _commit_text(c: dict) -> str:
    op = c["operation"]
    if op == "build":
        crawl = c.get("crawl")
        what = c.get("source") or "?"
        if crawl:
            what += f" (profile {crawl.get('profile')}, tag {crawl.get('tag')}, pages {crawl.get('pages')})"
        what += f": {c.get('images_in')} in, {c.get('added')} added"
        if c.get("rejected"):
            what += f", {c['rejected']} rejected"
        what += f"; build {c.get('build_id')}"
    elif op == "caption":
        what = (f"captioner {c.get('captioner')}, model {c.get('caption_model')}, prompt {c.get('caption_prompt_id')}"
                + (f": {c['captioned']} captioned" if c.get("captioned") is not None else ""))
    elif op == "restore":
        what = f"back to version {c.get('restored_version')}"
    else:
        what = c.get("note", "")
    if c.get("message"):
        what += f'; "{c["message"]}"'
    if c.get("undone_by") is not None:
        what += f" (undone by the restore in version {c['undone_by']})"
    return f"v{c['version']:<4} {c.get('time', ''):19}  {op:8} {what}"


def _link_lines(link: dict) -> list[tuple[str, str]]:
    kind = link["link"]
    if kind == "png":
        lines = [("image", link["uri"])]
        if "prompt" in link:
            neg = f', negative "{link["negative_prompt"]}"' if link.get("negative_prompt") else ""
            lines.append(("", f'"{link["prompt"]}"{neg}, {_settings_text(link)}'
                              + (f"; code {link['code_version']}" if link.get("code_version") else "")))
        return lines
    if kind == "set":
        return [("set", link["uri"]), ("", f"{link.get('id')}: theme \"{link.get('theme')}\", {link['items']} items, "
                                           f"{_settings_text(link.get('settings') or {})}")]
    if kind == "bulk_manifest":
        return [("bulk", f"{link['uri']} @ {link['version']}"), ("", f"prompts {link.get('prompts')}")]
    if kind == "model":
        t = link.get("training") or {}
        lr = (link.get("train_config") or {}).get("lr")
        loss = link.get("final_loss")
        run = (f"preset {link.get('preset')}, {link.get('steps')} steps on {t.get('workers')} workers "
               f"(ZeRO-{t.get('zero_stage')}, global batch {t.get('global_batch')}"
               + (f", lr {lr:g}" if isinstance(lr, (int, float)) else "") + ")"
               + (f", final loss {loss:.4f}" if isinstance(loss, (int, float)) else ""))
        encoders = f"VAE {link.get('vae')}, text encoder {link.get('text_encoder')}"
        lines = [("model", link["uri"]), ("", f"content id {link.get('content_id') or 'not recorded'}"), ("", run),
                 ("", f"{encoders}; code {link.get('code_version')}")]
        if link.get("note"):
            lines.append(("", f"note: {link['note']}"))
        return lines
    if kind == "latent_table":
        return [("latents", f"{link['uri']} @ {link['version']}"),
                ("", f"encode with preset {link.get('preset')}: VAE {link.get('vae')}, text encoder "
                     f"{link.get('text_encoder')}; code {link.get('code_version')}")]
    lines = [("dataset", f"{link['uri']} @ {link['version']} ({link['rows']} rows)"),
             ("", "commits that made its rows:")]
    if link.get("earlier_commits"):
        lines.append(("", f"(versions before {link['earlier_commits']} not listed: --commits N lists more)"))
    return lines + [("", "  " + _commit_text(c)) for c in link["commits"]]


def format_chain(result: dict) -> str:
    out = []
    for link in result["chain"]:
        out += [f"{label:9} {text}" for label, text in _link_lines(link)]
    if result["missing"]:
        out.append(f"missing link: {result['missing']['link']}: {result['missing']['reason']}")
    return "\n".join(out)


def format_row(result: dict) -> str:
    v, a = result["values"], result["arrived"]
    lines = [f"row {result['row']} of {result['dataset']} @ {result['version']}",
             f"  arrived in  {_commit_text(a)}",
             f"  source      {v.get('source')}: {v.get('source_url')}"
             + (f" (page {v['page_url']})" if v.get("page_url") else ""),
             f"  title       {v.get('title')!r}, tag {v.get('tag')!r}; ingested {v.get('ingested_at')}"]
    if v.get("caption") is not None:
        by = (f"caption model {v.get('caption_model')}, prompt {v.get('caption_prompt_id')}"
              if v.get("caption_model") else "from the source")
        cp = result.get("caption_pass")
        if cp:
            by += (f"; captioner {cp.get('captioner')} in version {cp['version']}" if cp["operation"] == "caption"
                   else f"; set by the {cp['operation']} in version {cp['version']}")
        lines.append(f"  caption     {v['caption']!r} ({by})")
    else:
        lines.append("  caption     none")
    for c in result["rewritten_by"]:
        lines.append(f"  rewritten   {_commit_text(c)}")
    lines.append(f"  data file   {result['file']}")
    if result.get("note"):
        lines.append(f"  note: {result['note']}")
    return "\n".join(lines)

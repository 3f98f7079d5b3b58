"""Following the chain from a PNG, a set, a bulk manifest, a model or a table back to the dataset commits.

`trace(target)` reads one record per link (PNG text chunks, manifest.json, model_card.json, the
commits of the latent table and dataset versions) and stops at the first link it cannot follow;
`commit_summary` and `made_rows` say what each dataset commit did (also used by `lineage.row`).
"""

from __future__ import annotations

from emoji_ldm.errors import UserError


class MissingLink(Exception):
    """A link of the chain that cannot be followed; `partial` is what was read of it, if anything."""

    def __init__(self, link: str, reason: str, partial: dict | None = None):
        super().__init__(f"{link}: {reason}")
        self.link, self.reason, self.partial = link, reason, partial


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
    return link, (_model, {"uri": params["model"], "content_id": params.get("model_content_id")})


def _set(uri: str):
    from emoji_ldm.store.artifacts import read_json

    manifest = read_json(uri)
    model = manifest.get("model") or {}
    link = {"link": "set", "uri": uri, "id": manifest.get("id"), "theme": manifest.get("theme"),
            "items": len(manifest.get("items") or []), "settings": manifest.get("settings")}
    if not model.get("uri"):
        raise MissingLink("set -> model", f"{uri} names no model (`model.uri`)", partial=link)
    return link, (_model, {"uri": model["uri"], "content_id": model.get("content_id")})


def _bulk_manifest(uri: str, version: int):
    from emoji_ldm.store.delta import commit_metadata, open_table
    from emoji_ldm.store.uri import DatasetRef

    meta = commit_metadata(open_table(DatasetRef(uri, version=version)))
    link = {"link": "bulk_manifest", "uri": uri, "version": version, "prompts": meta.get("source"),
            "code_version": meta.get("code_version")}
    if not meta.get("model"):
        raise MissingLink("bulk manifest -> model", f"the commit of {uri}@{version} names no model", partial=link)
    return link, (_model, {"uri": meta["model"], "content_id": meta.get("model_content_id")})


def _model(uri: str, content_id: str | None = None):
    from emoji_ldm.store.artifacts import exists, read_json
    from emoji_ldm.store.uri import join, public_uri

    card_uri = next((c for c in (join(uri, "model_card.json"), join(uri, "model", "model_card.json"))
                     if exists(c)), None)
    if card_uri is None:
        raise MissingLink("model", f"no model card (model_card.json) at {uri}: the model was deleted or moved")
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
    latent = card.get("latent_table")
    if not latent:
        raise MissingLink("model -> latent table", f"the card at {card_uri} names no latent table", partial=link)
    return link, (_latent_table, {"uri": public_uri(latent), "version": card.get("latent_table_version")})


def _latent_table(uri: str, version: int | None):
    from emoji_ldm.store.delta import commit_metadata, open_table
    from emoji_ldm.store.latents import encoded_dataset
    from emoji_ldm.store.uri import DatasetRef

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
    dataset, dataset_version = encoded_dataset(meta), meta.get("dataset_version")
    if dataset is None or dataset_version is None:
        raise MissingLink("latent table -> dataset", f"the encode commit of {uri}@{table.version()} names no dataset "
                                                     "version", partial=link)
    return link, (_dataset, {"uri": dataset, "version": dataset_version})


def _dataset(uri: str, version: int, commits: int = 1000):
    from emoji_ldm.store.delta import history, open_table, row_count
    from emoji_ldm.store.uri import DatasetRef

    try:
        table = open_table(DatasetRef(uri, version=version))
    except UserError as e:
        raise MissingLink("dataset", str(e)) from None
    rows = history(uri, limit=commits, upto=version)
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

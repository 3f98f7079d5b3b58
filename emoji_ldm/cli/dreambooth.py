"""`emoji-ldm dreambooth`: the CLI builds the instance photos' table with the dataset stage (`dataset build` at
OUT/instance), and the recipe (train/dreambooth.py) trains on it; train/ imports no dataset stage."""

from __future__ import annotations

from emoji_ldm.errors import UserError
from emoji_ldm.imaging import ImageConfig
from emoji_ldm.ingest.build import BuildConfig, build_dataset
from emoji_ldm.store.uri import filesystem, join
from emoji_ldm.train.dreambooth import DreamBoothConfig
from emoji_ldm.train.dreambooth import dreambooth as train_dreambooth
from emoji_ldm.train.dreambooth_data import MAX_INSTANCE, MIN_INSTANCE


def dreambooth(config: DreamBoothConfig) -> dict:
    """Personalise `config.base` on the instance photos; returns the exported model's card."""
    return train_dreambooth(config, instance_table)


def instance_table(config, out: str, size: int) -> tuple[str, int, list[dict]]:
    """Step 1: the photos as a dataset version at OUT/instance; (uri, version, [{id, source_url}] of its rows).

    Builds with a limit of one more than the maximum, so a huge folder is never ingested in full; a count out
    of range removes a table this run created, so nothing is left half-written."""
    from emoji_ldm.store.delta import arrow_dataset, open_table, row_count, table_exists

    uri = join(out, "instance")
    created = not table_exists(uri)
    summary = build_dataset(BuildConfig(source=config.instance_data, out=uri, image=ImageConfig(size=size),
                                        limit=MAX_INSTANCE + 1, message="dreambooth instance photos"))
    print(f"[dreambooth] instance photos: {summary.line()}", flush=True)
    table = open_table(uri)
    count = row_count(table)  # from the log: a table of an earlier run's OUT holds its rows too
    if not MIN_INSTANCE <= count <= MAX_INSTANCE:
        if created:
            fs, path = filesystem(uri)
            fs.delete_dir(path)
        raise UserError(f"--instance-data {config.instance_data!r} gave {count}"
                        f"{'+' if count > MAX_INSTANCE else ''} usable photos: DreamBooth takes "
                        f"{MIN_INSTANCE} to {MAX_INSTANCE} (10-20 is typical)")
    return uri, table.version(), arrow_dataset(table).head(count, columns=["id", "source_url"]).to_pylist()

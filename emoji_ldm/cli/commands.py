"""The registry of `emoji-ldm` commands: for each, its config class, the function it runs,
how its result is reported, and what Ctrl-C means for it.

`main.py` builds the parser from this table (flags come from the config class,
see `options.py`); `submit.py` reads the `stage` entries to submit a
command as a Ray Job. Classes and functions are named as "module:attribute"
and imported only for the command that runs, so `emoji-ldm --help` and
`emoji-ldm jobs list` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any

from emoji_ldm.cli.options import add_arguments, build_config
from emoji_ldm.errors import UserError

_DATASET_KEPT = "the dataset stays at its last committed version; re-run the same command to resume"


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # ("dataset", "build")
    config: str  # "module:ConfigClass"
    run: str  # "module:function": takes the config, returns a result
    help: str
    interrupted: str  # printed after Ctrl-C: what state the command leaves behind
    report: str | None = None  # "module:function": result -> text to print; None: print str(result) if any
    stage: str | None = None  # the name `emoji-ldm submit` knows it by
    script: str | None = None  # its ray_jobs/ entrypoint

    @property
    def name(self) -> str:
        return " ".join(self.words)

    def config_class(self) -> type:
        return load(self.config)


def load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


COMMANDS: tuple[Command, ...] = (
    Command(("dataset", "build"), "emoji_ldm.ingest.build:BuildConfig", "emoji_ldm.ingest.build:build_dataset",
            "ingest a source into a new version of the dataset at --out", _DATASET_KEPT,
            stage="build", script="build_dataset.py"),
    Command(("dataset", "caption"), "emoji_ldm.caption.stage:CaptionConfig",
            "emoji_ldm.caption.stage:caption_dataset",
            "caption rows (metadata | qwen2.5-vl | vllm) into new versions", _DATASET_KEPT,
            report="emoji_ldm.caption.stage:report", stage="caption", script="caption.py"),
    Command(("dataset", "versions"), "emoji_ldm.cli.dataset:VersionsConfig", "emoji_ldm.cli.dataset:versions_text",
            "list versions: time, operation, rows added/removed, message", "interrupted"),
    Command(("dataset", "show"), "emoji_ldm.cli.dataset:ShowConfig", "emoji_ldm.cli.dataset:show_command",
            "summarise a version; --sheet writes a contact sheet PNG", "interrupted; no sheet was written"),
    Command(("dataset", "diff"), "emoji_ldm.cli.dataset:DiffConfig", "emoji_ldm.cli.dataset:diff_command",
            "rows added/removed between two versions (by content hash)", "interrupted"),
    Command(("dataset", "tag"), "emoji_ldm.cli.dataset:TagConfig", "emoji_ldm.cli.dataset:tag_command",
            "name a version; read it back as URI@NAME", "interrupted; the tags are as they were"),
    Command(("dataset", "restore"), "emoji_ldm.cli.dataset:RestoreConfig", "emoji_ldm.cli.dataset:restore_command",
            "make an old version current again (as a new version)", _DATASET_KEPT),
    Command(("crawl",), "emoji_ldm.crawl.crawler:CrawlConfig", "emoji_ldm.crawl.crawler:crawl",
            "crawl a site's tag pages in headless Chromium into a new dataset version",
            "the dataset stays at its last committed version; re-run the same command to resume "
            "(finished shards are skipped)", report="emoji_ldm.crawl.crawler:report", stage="crawl", script="crawl.py"),
    Command(("train-vae",), "emoji_ldm.train.vae:VAETrainConfig", "emoji_ldm.train.vae:train_vae",
            "stage 1: train the preset's own VAE (tiny) on a dataset, on Ray Train",
            "interrupted; no VAE was exported", report="emoji_ldm.train.vae:report",
            stage="train-vae", script="train_vae.py"),
    Command(("encode",), "emoji_ldm.train.encode:EncodeConfig", "emoji_ldm.train.encode:encode",
            "run the frozen VAE + text encoder once (Ray Data) into a latent table",
            "the latent table stays at its last committed version", report="emoji_ldm.train.encode:report",
            stage="encode", script="encode.py"),
    Command(("train",), "emoji_ldm.train.ldm:TrainConfig", "emoji_ldm.train.ldm:train",
            "train the UNet on a latent table: Ray Train + DeepSpeed ZeRO",
            "interrupted; re-run with --resume to continue from the last checkpoint under --out",
            report="emoji_ldm.train.ldm:report", stage="train", script="train.py"),
    Command(("dreambooth",), "emoji_ldm.train.dreambooth:DreamBoothConfig", "emoji_ldm.cli.dreambooth:dreambooth",
            "personalise a model on 3-1000 photos of one subject (DreamBooth, full or LoRA, with prior "
            "preservation): Ray Data class images, Ray Train + DeepSpeed",
            "interrupted; re-run with --resume to continue from the last checkpoint under --out (the instance "
            "table and the class images made so far are reused)",
            report="emoji_ldm.train.dreambooth:report", stage="dreambooth", script="dreambooth.py"),
    Command(("train-step-check",), "emoji_ldm.train.check:StepCheckConfig", "emoji_ldm.train.check:step_check",
            "the real training step on random latents in one process (no Ray): images/s, MFU, peak memory",
            "interrupted", report="emoji_ldm.train.check:report"),
    Command(("generate",), "emoji_ldm.inference.generate:GenerateConfig", "emoji_ldm.inference.generate:generate",
            "generate emoji PNGs and a sheet from a trained model",
            "interrupted; no images were written", report="emoji_ldm.inference.generate:report"),
    Command(("eval",), "emoji_ldm.eval.evaluate:EvalConfig", "emoji_ldm.eval.evaluate:evaluate",
            "emoji-FID/KID, precision/recall, prompt accuracy, held-out loss, memorisation of a trained model",
            "interrupted; no report was written", report="emoji_ldm.eval.evaluate:format_report"),
    Command(("train-judge",), "emoji_ldm.eval.judge:JudgeConfig", "emoji_ldm.eval.judge:train_judge",
            "without --data, rebuild the frozen judge eval uses (prints whether its content id matches); with "
            "--data, a judge of your data for eval --judge", "interrupted; no judge was written",
            report="emoji_ldm.eval.judge:report"),
    Command(("serve",), "emoji_ldm.serve.run:ServeConfig", "emoji_ldm.serve.run:serve_forever",
            "serve the HTTP API and web page on Ray Serve until Ctrl-C", "serve: stopped"),
    Command(("bulk",), "emoji_ldm.inference.bulk:BulkConfig", "emoji_ldm.inference.bulk:bulk_generate",
            "generate images for every prompt in a file (Ray Data actors), resumable",
            "interrupted; the manifest keeps every committed chunk: re-run the same command to resume",
            report="emoji_ldm.inference.bulk:report", stage="bulk", script="bulk_generate.py"),
    Command(("lineage",), "emoji_ldm.lineage.command:LineageConfig", "emoji_ldm.lineage.command:lineage_command",
            "trace a PNG, set, model or table back to its model, latent table, dataset and the commits that "
            "made it; --row ID: one row's origin (exit 1: a missing link)", "interrupted"),
    Command(("provenance", "dev-cert"), "emoji_ldm.lineage.provenance_cmd:DevCertConfig",
            "emoji_ldm.lineage.provenance_cmd:dev_cert", "make a CA and an end-entity chain for local C2PA signing "
            "(ca.pem, chain.pem, key.pem under --out)", "interrupted; no key was written",
            report="emoji_ldm.lineage.provenance_cmd:dev_cert_report"),
    Command(("submit",), "emoji_ldm.cli.submit:SubmitConfig", "emoji_ldm.cli.submit:submit",
            "run a stage on a Ray cluster as a Ray Job (the RayJob's entrypoint) and follow it",
            "stopped following; the job goes on (emoji-ldm jobs stop ID stops it)"),
    Command(("jobs", "list"), "emoji_ldm.cli.submit:JobsListConfig", "emoji_ldm.cli.submit:list_command",
            "every job: id, status, stage, start, seconds, entrypoint", "interrupted"),
    Command(("jobs", "logs"), "emoji_ldm.cli.submit:JobLogsConfig", "emoji_ldm.cli.submit:logs_command",
            "a job's logs so far; --follow until it ends", "stopped following; the job goes on"),
    Command(("jobs", "stop"), "emoji_ldm.cli.submit:JobStopConfig", "emoji_ldm.cli.submit:stop_command",
            "stop a running job and wait for its final status", "stopped waiting; the stop request was sent"),
    Command(("keys", "create"), "emoji_ldm.serve.keys:KeysCreateConfig", "emoji_ldm.serve.keys:create_command",
            "add an API key to the key file and print it once", "interrupted; the key file is as it was"),
    Command(("keys", "list"), "emoji_ldm.serve.keys:KeysFileConfig", "emoji_ldm.serve.keys:list_command",
            "the keys of a key file: name, rate, jobs quota, state (never the key)", "interrupted"),
    Command(("keys", "revoke"), "emoji_ldm.serve.keys:KeysRevokeConfig", "emoji_ldm.serve.keys:revoke_command",
            "revoke a key; a running service stops taking it within seconds", "interrupted"),
    Command(("keys", "rotate-webhook-secret"), "emoji_ldm.serve.keys:KeysRotateConfig",
            "emoji_ldm.serve.keys:rotate_command", "a new webhook secret; the old one signs beside it a while",
            "interrupted; the key file is as it was"),
    Command(("keys", "secret"), "emoji_ldm.serve.keys:KeysSecretConfig", "emoji_ldm.serve.keys:secret_command",
            "print the key file as a Kubernetes Secret manifest (kubectl apply -f -)", "interrupted"),
    Command(("weights", "mirror"), "emoji_ldm.store.mirror:MirrorConfig", "emoji_ldm.store.mirror:mirror_command",
            "mirror hub models to S3 for pods with HF_HUB_OFFLINE", "interrupted; run it again"),
)

GROUPS = {
    "dataset": "build and inspect versioned emoji datasets (Delta Lake)",
    "jobs": "list, read and stop the Ray Jobs of a cluster",
    "keys": "manage the API keys of `emoji-ldm serve` (a key file, or a Secret manifest)",
    "weights": "hub weights on our own storage",
    "provenance": "C2PA signing keys for local use (`lineage FILE` verifies a signed emoji)",
}

# stage -> command, for `emoji-ldm submit STAGE` and the RayJob manifests
STAGES: dict[str, Command] = {c.stage: c for c in COMMANDS if c.stage}


def find(words: tuple[str, ...]) -> Command | None:
    return next((c for c in COMMANDS if c.words == words), None)


class UsageError(Exception):
    """A command line that does not parse; carries the usage of the parser that refused it."""

    def __init__(self, usage: str, message: str):
        super().__init__(message)
        self.usage = usage


class Parser(argparse.ArgumentParser):
    """argparse that raises `UsageError` instead of exiting, and takes flags only in full."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a stage flag passed through `submit` must not match a prefix
        super().__init__(*args, **kwargs)

    def error(self, message):  # raise instead of exiting, so callers decide how to report it
        raise UsageError(self.format_usage(), message)


def make_parser(command: Command, prog: str | None = None):
    """A standalone parser for one command (used by `submit` to check a stage's flags)."""
    parser = Parser(prog=prog or f"emoji-ldm {command.name}", description=command.help)
    add_arguments(parser, command.config_class())
    return parser


def parse_config(command: Command, argv: list[str]) -> Any:
    """The command's config from its flags, or a UserError naming what is wrong."""
    try:
        args = make_parser(command).parse_args(argv)
    except UsageError as e:
        raise UserError(f"`emoji-ldm {command.name}` flags do not parse: {e}; "
                        f"`emoji-ldm {command.name} --help` lists them") from None
    return build_config(command.config_class(), args)

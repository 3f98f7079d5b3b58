"""The `emoji-ldm` command line: one sub-command per library function.

Every command validates its arguments, calls one typed function and prints
its result. A `UserError` prints as one line `emoji-ldm: error: ...` with exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from emoji_ldm import __version__
from emoji_ldm.errors import UserError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return value


def _version_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"version {text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"version {text!r} must be 0 or more")
    return value


# --- dataset -----------------------------------------------------------------


def cmd_dataset_build(args) -> int:
    from emoji_ldm.ingest.build import BuildConfig, build_dataset
    from emoji_ldm.ingest.images import ImageConfig
    from emoji_ldm.sources import FetchConfig

    config = BuildConfig(
        source=args.source,
        out=args.out,
        image=ImageConfig(size=args.image_size, background=args.background, max_pixels=args.max_pixels),
        fetch=FetchConfig(timeout_s=args.timeout, retries=args.retries, threads=args.threads, per_host=args.per_host),
        limit=args.limit,
        message=args.message,
        batch_size=args.batch_size,
    )
    summary = build_dataset(config)
    if summary.rejects_uri:
        print(f"rejected inputs with reasons: {summary.rejects_uri}")
    print(summary.line())
    return 0


def cmd_dataset_caption(args) -> int:
    from emoji_ldm.caption.stage import CaptionConfig, caption_dataset

    caption_dataset(CaptionConfig(dataset=args.uri, captioner=args.captioner, model=args.model,
                                  template=args.template, batch_size=args.batch_size, concurrency=args.concurrency,
                                  num_gpus=args.num_gpus, only_missing=args.only_missing,
                                  chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                                  message=args.message))
    return 0


def cmd_dataset_versions(args) -> int:
    from emoji_ldm.store.ops import format_versions, versions

    print(format_versions(versions(args.uri)))
    return 0


def cmd_dataset_show(args) -> int:
    from emoji_ldm.store.ops import show
    from emoji_ldm.store.uri import DatasetRef, normalize_uri

    if args.version is not None and args.tag is not None:
        raise UserError("give --version or --tag, not both")
    ref = DatasetRef.parse(args.uri)
    if args.version is not None or args.tag is not None:
        ref = DatasetRef(normalize_uri(ref.uri), version=args.version, tag=args.tag)
    summary = show(ref, sheet=args.sheet, sheet_count=args.sheet_count)
    print(summary.text())
    if args.sheet:
        print(f"contact sheet: {args.sheet}")
    return 0


def cmd_dataset_diff(args) -> int:
    from emoji_ldm.store.ops import diff

    result = diff(args.uri, args.a, args.b)
    print(result.text())
    for id_ in result.added[: args.show]:
        print(f"+ {id_}")
    for id_ in result.removed[: args.show]:
        print(f"- {id_}")
    return 0


def cmd_dataset_tag(args) -> int:
    from emoji_ldm.store.ops import tag

    tag(args.uri, args.name, args.version)
    print(f"tagged version {args.version} of {args.uri} as {args.name!r} (read it as {args.uri}@{args.name})")
    return 0


def cmd_dataset_restore(args) -> int:
    from emoji_ldm.store.ops import restore

    new = restore(args.uri, args.version, message=args.message)
    print(f"restored version {args.version} of {args.uri} as new version {new}")
    return 0


# --- models -------------------------------------------------------------------


def _preset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny | emoji64 | sd-finetune (default tiny)")
    p.add_argument("--set", dest="sets", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a preset field, e.g. --set train.lr=2e-4 --set unet.finetune=lora (repeatable)")
    p.add_argument("--gpu", action="store_true", help="use GPUs (nccl, bf16); default CPU (gloo, fp32)")


def cmd_train_vae(args) -> int:
    from emoji_ldm.models.presets import parse_sets
    from emoji_ldm.train.vae import VAETrainConfig, train_vae

    card = train_vae(VAETrainConfig(dataset=args.dataset, out=args.out, preset=args.preset,
                                    overrides=parse_sets(args.sets), workers=args.workers,
                                    max_steps=args.max_steps, use_gpu=args.gpu))
    m = card["metrics"]
    print(f"train-vae: {m['steps']} steps, loss {m['loss']:.4f}, reconstruction MSE {m['recon_mse']:.4f}, "
          f"latent scaling factor {m['scaling_factor']:.4f} -> {args.out}")
    return 0


def cmd_encode(args) -> int:
    from emoji_ldm.models.presets import parse_sets
    from emoji_ldm.train.encode import EncodeConfig, encode

    encode(EncodeConfig(dataset=args.dataset, out=args.out, preset=args.preset, overrides=parse_sets(args.sets),
                        vae=args.vae, batch_size=args.batch_size, concurrency=args.concurrency, use_gpu=args.gpu,
                        vae_steps=args.vae_steps))
    return 0


def cmd_train(args) -> int:
    from emoji_ldm.models.presets import parse_sets
    from emoji_ldm.train.ldm import TrainConfig, train

    card = train(TrainConfig(data=args.data, out=args.out, preset=args.preset, overrides=parse_sets(args.sets),
                             workers=args.workers, zero_stage=args.zero_stage, batch_size=args.batch_size,
                             max_steps=args.max_steps, epochs=args.epochs, resume=args.resume, use_gpu=args.gpu,
                             max_failures=args.max_failures))
    loss = card["metrics"].get("loss")
    print(f"train: {card['training']['steps']} steps, final loss {loss if loss is None else round(loss, 4)} -> "
          f"model {args.out.rstrip('/')}/model, samples {args.out.rstrip('/')}/samples")
    return 0


def cmd_generate(args) -> int:
    from emoji_ldm.generate import GenerateConfig, generate

    paths = generate(GenerateConfig(model=args.model, prompt=args.prompt, out=args.out,
                                    negative_prompt=args.negative_prompt, n=args.n, steps=args.steps,
                                    guidance=args.guidance, seed=args.seed, scheduler=args.scheduler))
    print(f"generate: {len(paths)} images and sheet.png in {args.out}")
    return 0


def cmd_eval(args) -> int:
    from emoji_ldm.evaluate import EvalConfig, evaluate, format_report

    print(format_report(evaluate(EvalConfig(model=args.model, data=args.data, samples=args.samples,
                                            steps=args.steps, seed=args.seed, near_copy=args.near_copy,
                                            clip=args.clip, out=args.out))))
    return 0


def cmd_serve(args) -> int:
    from emoji_ldm.serve.run import ServeConfig, default_config_path, serve_forever

    serve_forever(ServeConfig(model=args.model, host=args.host, port=args.port, sets_uri=args.sets_uri,
                              config=args.config or default_config_path(), max_batch_size=args.max_batch_size))
    return 0


def cmd_bulk(args) -> int:
    from emoji_ldm.serve.bulk import BulkConfig, bulk_generate

    bulk_generate(BulkConfig(model=args.model, prompts=args.prompts, out=args.out, per_prompt=args.per_prompt,
                             negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                             scheduler=args.scheduler, seed=args.seed, batch_size=args.batch_size,
                             concurrency=args.concurrency, num_cpus=args.num_cpus, num_gpus=args.num_gpus, chunk_size=args.chunk_size,
                             limit=args.limit))
    return 0


def cmd_crawl(args) -> int:
    from emoji_ldm.crawl.crawler import CrawlConfig, crawl
    from emoji_ldm.ingest.images import ImageConfig
    from emoji_ldm.sources import FetchConfig

    summary, stats = crawl(CrawlConfig(
        profile=args.profile, tag=args.tag, out=args.out, pages=args.pages, workers=args.workers,
        shard_pages=args.shard_pages, rate_per_host=args.rate, retries=args.retries, robots=not args.ignore_robots,
        image=ImageConfig(size=args.image_size), fetch=FetchConfig(threads=args.threads, per_host=args.per_host),
        message=args.message))
    if summary.rejects_uri:
        print(f"rejected images with reasons: {summary.rejects_uri}")
    print(summary.line())
    return 0


def cmd_submit(args) -> int:
    from emoji_ldm.jobs import SubmitConfig, submit

    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--env {item!r} is not NAME=VALUE")
        env[key] = value
    return submit(SubmitConfig(stage=args.stage, args=args.stage_args, address=args.address,
                               working_dir=args.working_dir, installed=args.installed, env=env,
                               forward_aws=args.forward_aws, num_cpus=args.entrypoint_num_cpus,
                               num_gpus=args.entrypoint_num_gpus, wait=not args.no_wait,
                               submission_id=args.submission_id))


def cmd_jobs(args) -> int:
    from emoji_ldm import jobs

    address = args.address or jobs.default_address()
    if args.jobs_command == "list":
        print(jobs.format_jobs(jobs.list_jobs(address)))
        return 0
    if args.jobs_command == "logs":
        return jobs.job_logs(address, args.job_id, follow_logs=args.follow)
    status = jobs.stop_job(address, args.job_id, wait=not args.no_wait)
    print(f"job {args.job_id}: {status}")
    return 0


def _sampler_args(p: argparse.ArgumentParser) -> None:
    """The sampler settings `generate` and `bulk` share (and the HTTP API's fields)."""
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--seed", type=int, default=0, help="image k uses the noise of seed + k (default 0)")
    p.add_argument("--scheduler", default="dpmpp", help="dpmpp | ddim | ddpm (default dpmpp)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emoji-ldm", description="Versioned emoji datasets, latent diffusion training and bulk generation on Ray."
    )
    parser.add_argument("--version", action="version", version=f"emoji-ldm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    dataset = sub.add_parser("dataset", help="build and inspect versioned emoji datasets (Delta Lake)")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True)

    b = dsub.add_parser("build", help="ingest a source into a new version of the dataset at --out")
    b.add_argument("--source", required=True, help="twemoji | dir:PATH | urls:FILE (.txt, .csv or .parquet)")
    b.add_argument("--out", required=True, help="dataset URI: a local path or s3://bucket/prefix")
    b.add_argument("--image-size", type=_positive_int, default=64, help="stored images are N x N (default 64)")
    b.add_argument("--background", default="white", help="colour that transparency is composited onto (default white)")
    b.add_argument("--max-pixels", type=_positive_int, default=4096 * 4096,
                   help="reject images with more pixels than this (decompression bombs; default 4096*4096)")
    b.add_argument("--limit", type=_positive_int, help="ingest at most N source items")
    b.add_argument("--message", default="", help="a note recorded with the new version")
    b.add_argument("--timeout", type=float, default=10.0, help="urls: seconds per download attempt (default 10)")
    b.add_argument("--retries", type=int, default=3, help="urls: retries on timeouts, 429 and 5xx (default 3)")
    b.add_argument("--threads", type=_positive_int, default=4, help="urls: concurrent downloads per Ray task (default 4)")
    b.add_argument("--per-host", type=_positive_int, default=4, help="urls: concurrent connections per host per task (default 4)")
    b.add_argument("--batch-size", type=_positive_int, default=128, help="images per Ray Data batch (default 128)")
    b.set_defaults(func=cmd_dataset_build)

    c = dsub.add_parser("caption", help="caption rows (metadata | qwen2.5-vl | vllm) into new versions")
    c.add_argument("uri", help="dataset URI (its latest version is captioned)")
    c.add_argument("--captioner", default="metadata", help="metadata (default, no model) | qwen2.5-vl | vllm")
    c.add_argument("--model", help="qwen2.5-vl/vllm: hub id or local folder (default Qwen/Qwen2.5-VL-3B-Instruct)")
    c.add_argument("--template", help="a file with your own instruction; must contain {title}")
    c.add_argument("--batch-size", type=_positive_int, default=16, help="rows per model call (default 16)")
    c.add_argument("--concurrency", type=_positive_int, default=1, help="model actors / vLLM engines (default 1)")
    c.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model actor; > 0 runs bf16 (default 0)")
    c.add_argument("--only-missing", action="store_true", help="caption only rows without a caption (resume)")
    c.add_argument("--chunk-size", type=_positive_int, default=2048, help="rows per committed version (default 2048)")
    c.add_argument("--max-new-tokens", type=_positive_int, default=128, help="caption length cap in tokens (128)")
    c.add_argument("--limit", type=_positive_int, help="caption at most N rows")
    c.add_argument("--message", default="", help="a note recorded with the new version(s)")
    c.set_defaults(func=cmd_dataset_caption)

    v = dsub.add_parser("versions", help="list versions: time, operation, rows added/removed, message")
    v.add_argument("uri")
    v.set_defaults(func=cmd_dataset_versions)

    s = dsub.add_parser("show", help="summarise a version; --sheet writes a contact sheet PNG")
    s.add_argument("uri", help="URI, URI@VERSION or URI@TAG")
    s.add_argument("--version", dest="version", type=_version_number, help="version number to show")
    s.add_argument("--tag", help="tag name to show")
    s.add_argument("--sheet", help="write a contact sheet of images with titles/captions to this PNG")
    s.add_argument("--sheet-count", type=_positive_int, default=64, help="images on the sheet (default 64)")
    s.set_defaults(func=cmd_dataset_show)

    d = dsub.add_parser("diff", help="rows added/removed between two versions (by content hash)")
    d.add_argument("uri")
    d.add_argument("a", help="version number or tag")
    d.add_argument("b", help="version number or tag")
    d.add_argument("--show", type=int, default=10, help="print up to N ids of each side (default 10)")
    d.set_defaults(func=cmd_dataset_diff)

    t = dsub.add_parser("tag", help="name a version; read it back as URI@NAME")
    t.add_argument("uri")
    t.add_argument("name")
    t.add_argument("version", type=_version_number)
    t.set_defaults(func=cmd_dataset_tag)

    r = dsub.add_parser("restore", help="make an old version current again (as a new version)")
    r.add_argument("uri")
    r.add_argument("version", type=_version_number)
    r.add_argument("--message", default="", help="a note recorded with the new version")
    r.set_defaults(func=cmd_dataset_restore)

    cr = sub.add_parser("crawl", help="crawl a site's tag pages in headless Chromium into a new dataset version")
    cr.add_argument("--profile", required=True, help="a built-in site profile (discords) or a profile YAML file")
    cr.add_argument("--tag", required=True, help="the tag to crawl, e.g. Blobs")
    cr.add_argument("--out", required=True, help="dataset URI: a local path or s3://bucket/prefix")
    cr.add_argument("--pages", help="page range N-M (default: the profile's, discords 1-1000)")
    cr.add_argument("--workers", type=_positive_int, default=2, help="browsers, one per Ray actor (default 2)")
    cr.add_argument("--shard-pages", type=_positive_int, default=5, help="pages per shard (default 5)")
    cr.add_argument("--rate", type=float, default=1.0,
                    help="page loads per second per host, all browsers together; 0 lifts the limit (default 1)")
    cr.add_argument("--retries", type=int, default=2, help="extra attempts per page (default 2)")
    cr.add_argument("--ignore-robots", action="store_true", help="do not honour robots.txt (only with permission)")
    cr.add_argument("--threads", type=_positive_int, default=4, help="concurrent image downloads per task (4)")
    cr.add_argument("--per-host", type=_positive_int, default=4, help="connections per host per task (4)")
    cr.add_argument("--image-size", type=_positive_int, default=64, help="stored images are N x N (default 64)")
    cr.add_argument("--message", default="", help="a note recorded with the new version")
    cr.set_defaults(func=cmd_crawl)

    tv = sub.add_parser("train-vae", help="stage 1: train the preset's own VAE (tiny) on a dataset, on Ray Train")
    tv.add_argument("--dataset", required=True, help="URI, URI@VERSION or URI@TAG")
    tv.add_argument("--out", required=True, help="where the AutoencoderKL folder goes (local or s3://)")
    tv.add_argument("--workers", type=_positive_int, default=2, help="Ray Train workers (default 2)")
    tv.add_argument("--max-steps", type=_positive_int, help="default: the preset's vae.train_steps")
    _preset_args(tv)
    tv.set_defaults(func=cmd_train_vae)

    en = sub.add_parser("encode", help="run the frozen VAE + text encoder once (Ray Data) into a latent table")
    en.add_argument("--dataset", required=True, help="URI, URI@VERSION or URI@TAG")
    en.add_argument("--out", required=True, help="latent table URI (a new version per encode)")
    en.add_argument("--vae", help="a trained VAE folder/URI (tiny); without it tiny trains one first")
    en.add_argument("--vae-steps", type=_positive_int, help="steps when encode trains the VAE itself")
    en.add_argument("--batch-size", type=_positive_int, default=64, help="rows per encoder call (default 64)")
    en.add_argument("--concurrency", type=_positive_int, default=1, help="encoder actors (default 1)")
    _preset_args(en)
    en.set_defaults(func=cmd_encode)

    tr = sub.add_parser("train", help="train the UNet on a latent table: Ray Train + DeepSpeed ZeRO")
    tr.add_argument("--data", required=True, help="latent table URI[@VERSION]")
    tr.add_argument("--out", required=True, help="run output URI: model/, checkpoints/, samples/, metrics")
    tr.add_argument("--workers", type=_positive_int, default=2, help="Ray Train workers (default 2)")
    tr.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed ZeRO stage 0-3 (default 2)")
    tr.add_argument("--batch-size", type=_positive_int, help="global batch (default: the preset's)")
    steps = tr.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=_positive_int, help="optimizer steps (default: the preset's)")
    steps.add_argument("--epochs", type=float, help="passes over the training rows instead of --max-steps")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --out")
    tr.add_argument("--max-failures", type=int, default=2, help="worker restarts from the last checkpoint (default 2)")
    _preset_args(tr)
    tr.set_defaults(func=cmd_train)

    ge = sub.add_parser("generate", help="generate emoji PNGs and a sheet from a trained model")
    ge.add_argument("--model", required=True, help="a model folder/URI (or a training --out)")
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--n", type=int, default=4, help="images (1-64, default 4)")
    _sampler_args(ge)
    ge.add_argument("--out", required=True, help="a local folder for the PNGs and sheet.png")
    ge.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="serve the HTTP API and web page on Ray Serve until Ctrl-C")
    sv.add_argument("--model", required=True, help="a model folder/URI (or a training --out)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sv.add_argument("--sets-uri", default="", help='where `"store": true` emoji sets are written (local or s3://)')
    sv.add_argument("--max-batch-size", type=_positive_int, help="images per pipeline call (default: the config's, 16)")
    sv.add_argument("--config", help="a Serve config file (default: the packaged emoji_ldm/serve/serve_config.yaml)")
    sv.set_defaults(func=cmd_serve)

    bu = sub.add_parser("bulk", help="generate images for every prompt in a file (Ray Data actors), resumable")
    bu.add_argument("--model", required=True, help="a model folder/URI (or a training --out)")
    bu.add_argument("--prompts", required=True, help=".txt (one per line), .csv or .parquet with a prompt column")
    bu.add_argument("--out", required=True, help="output URI: images/ and the manifest/ Delta table")
    bu.add_argument("--per-prompt", type=_positive_int, default=4, help="images per prompt (default 4)")
    _sampler_args(bu)
    bu.add_argument("--batch-size", type=_positive_int, default=32, help="images per pipeline call (default 32)")
    bu.add_argument("--concurrency", type=_positive_int, default=1, help="model actors (default 1)")
    bu.add_argument("--num-cpus", type=float, default=1.0,
                    help="CPUs per model actor; on CPU it is also the actor's torch threads (default 1)")
    bu.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model actor (default 0: CPU)")
    bu.add_argument("--chunk-size", type=_positive_int, default=512,
                    help="prompts per manifest commit; a killed job redoes at most one chunk (default 512)")
    bu.add_argument("--limit", type=_positive_int, help="only the first N distinct prompts")
    bu.set_defaults(func=cmd_bulk)

    ev = sub.add_parser("eval", help="held-out denoising loss, memorisation, CLIP score of a trained model")
    ev.add_argument("--model", required=True, help="a model folder/URI (or a training --out)")
    ev.add_argument("--data", required=True, help="the latent table URI[@VERSION] it was trained on")
    ev.add_argument("--samples", type=int, default=32, help="samples for memorisation / CLIP score (default 32)")
    ev.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--near-copy", type=float, default=0.005, help="pixel MSE that counts as a copy (default 0.005)")
    ev.add_argument("--clip", help="a local CLIP model folder for the CLIP score")
    ev.add_argument("--out", help="also write the report as JSON here")
    ev.set_defaults(func=cmd_eval)

    from emoji_ldm.jobs import STAGES

    su = sub.add_parser(
        "submit", allow_abbrev=False,
        help="run a stage on a Ray cluster as a Ray Job (the RayJob's entrypoint) and follow it",
        description="Submit STAGE as a Ray Job: every flag not listed here is the stage's own "
                    "(see `emoji-ldm <stage> --help`), e.g. `emoji-ldm submit train --data s3://b/latents "
                    "--out s3://b/runs/tiny --address http://HEAD:8265`.")
    su.add_argument("stage", choices=list(STAGES), help="the stage to run")
    su.add_argument("--address", default="", help="Ray dashboard URL, http://HEAD:8265 "
                    "(default: $RAY_API_SERVER_ADDRESS or an http:// $RAY_ADDRESS)")
    su.add_argument("--working-dir", help="the checkout to upload (default: the one emoji-ldm runs from)")
    su.add_argument("--installed", action="store_true",
                    help="upload nothing: run the emoji-ldm installed in the cluster's image")
    su.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a variable for the job")
    su.add_argument("--forward-aws", action="store_true",
                    help="copy this shell's AWS_* variables into the job (they show in the job's info)")
    su.add_argument("--entrypoint-num-cpus", type=float, default=0.0, help="CPUs reserved for the driver (0)")
    su.add_argument("--entrypoint-num-gpus", type=float, default=0.0, help="GPUs reserved for the driver (0)")
    su.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following")
    su.add_argument("--submission-id", default="", help="the job id (default emoji-ldm-STAGE-TIME-HEX)")
    su.set_defaults(func=cmd_submit)

    jb = sub.add_parser("jobs", help="list, read and stop the Ray Jobs of a cluster")
    jsub = jb.add_subparsers(dest="jobs_command", required=True)
    address_help = "Ray dashboard URL, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)"
    jl = jsub.add_parser("list", help="every job: id, status, stage, start, seconds, entrypoint")
    jl.add_argument("--address", default="", help=address_help)
    jo = jsub.add_parser("logs", help="a job's logs so far; --follow until it ends")
    jo.add_argument("job_id")
    jo.add_argument("--follow", action="store_true", help="follow until the job ends; exit 1 unless it succeeded")
    jo.add_argument("--address", default="", help=address_help)
    js = jsub.add_parser("stop", help="stop a running job and wait for its final status")
    js.add_argument("job_id")
    js.add_argument("--no-wait", action="store_true")
    js.add_argument("--address", default="", help=address_help)
    jb.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `submit` passes every flag it does not know on to the stage; everything else is strict
    args, extra = parser.parse_known_args(argv)
    if args.command == "submit":
        args.stage_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except UserError as e:
        print(f"emoji-ldm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emoji-ldm: interrupted; the dataset stays at its last committed version", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

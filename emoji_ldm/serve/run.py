"""`emoji-ldm serve`: the Serve application on a local Ray (or the RAY_ADDRESS cluster), until Ctrl-C.

It reads the same `serve_config.yaml` as `serve run`/`serve deploy` and the
RayService, then overrides the model, the sets URI and where HTTP listens.
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.serve.placement import check_gpu_share, fit_gpus, generator_resources, node_gpus

APP_NAME = "emoji"


def default_config_path() -> str:
    return str(resources.files("emoji_ldm.serve").joinpath("serve_config.yaml"))


def load_serve_config(path: str) -> dict:
    """The Serve config file, validated with Ray's own schema (the one `serve deploy` uses)."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    p = Path(path)
    if not p.is_file():
        raise UserError(f"serve config {path!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
        ServeDeploySchema.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as e:
        raise UserError(f"serve config {path!r} is not a valid Serve config: {e}") from None
    apps = [a for a in raw["applications"] if a.get("import_path", "").startswith("emoji_ldm.serve.app:")]
    if not apps:
        raise UserError(f"serve config {path!r} has no application with import_path emoji_ldm.serve.app:build_app")
    return raw


@dataclass(frozen=True)
class ServeConfig:
    model: str = opt(help="a model folder/URI (or a training --out)")
    host: str = opt("127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    port: int = opt(8000, help="HTTP port")
    sets_uri: str = opt("", help='where `"store": true` emoji sets are written (local or s3://)')
    config: str | None = opt(None, help="a Serve config file (default: the packaged "
                                         "emoji_ldm/serve/serve_config.yaml)")
    max_batch_size: int | None = opt(None, help="images per pipeline call (default: the config's, 16)")
    png_metadata: bool = opt(True, flag="no-png-metadata", invert=True,
                             help="serve PNGs without their generation parameters and model id")
    adapters: dict[str, str] = opt(default_factory=dict, flag="adapter", metavar="NAME=URI",
                                   help="a LoRA adapter (dreambooth --method lora output) served on top of the model, "
                                        "chosen per request with \"adapter\": NAME (repeatable)")
    gpus: float = opt(0.0, help="GPUs per replica, and per job's drawer with --jobs-uri (Ray's num_gpus: a share "
                                "below 1, e.g. 0.5, or a whole number); 0: replicas run on CPU. The Generator's "
                                "max_replicas, plus a job's drawer, must fit the cluster's GPUs at peak")
    keys: str = opt("", help="the API key file (emoji-ldm keys create; local or s3://, on Kubernetes the mounted "
                             "Secret): every request then needs a key (but the page and /healthz). Default: "
                             "$EMOJI_LDM_API_KEYS, else no keys and only 127.0.0.1 may listen")
    insecure: bool = opt(False, help="listen on a public address without API keys (anyone who reaches it can "
                                     "generate)")
    jobs_uri: str = opt("", help="where /v1/jobs keep their state and results (local or s3://; on a cluster, "
                                 "shared storage); default: no jobs")
    webhook_allow: tuple[str, ...] = opt((), metavar="CIDR", help="an address range job callbacks may reach "
                                                                  "besides public ones, e.g. 10.0.0.0/8 "
                                                                  "(repeatable)")
    judge: str = opt("", help="an emoji judge (emoji-ldm train-judge --out; local or s3://, on a cluster shared "
                              "storage): every set's manifest reports legibility at chat size and consistency, and "
                              "a set may ask for min_legibility. Default: the Serve config's args.judge, else none")

    def __post_init__(self):
        import ipaddress
        import os

        if not self.keys and os.environ.get("EMOJI_LDM_API_KEYS"):
            object.__setattr__(self, "keys", os.environ["EMOJI_LDM_API_KEYS"])
        try:
            loopback = self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = False
        if not self.keys and not loopback and not self.insecure:
            raise UserError(f"--host {self.host} without API keys would let anyone who reaches it generate: "
                            "pass --keys FILE (emoji-ldm keys create), or --insecure to do it anyway")
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be from 1 to 65535, got {self.port}")
        if not 0 <= self.gpus <= 8:
            raise UserError(f"--gpus must be from 0 to 8 per replica, got {self.gpus}")
        check_gpu_share("--gpus", self.gpus)


def check_shared(args: dict) -> None:
    """Refuse a local path that replicas or job runners on other nodes must read or write (runtime/shared.py)."""
    from emoji_ldm.runtime.shared import require_shared

    for key, what in (("model", "the model (--model)"), ("sets_uri", "--sets-uri"), ("jobs_uri", "--jobs-uri"),
                      ("keys", "the API key file (--keys)"), ("judge", "the judge (--judge)")):
        require_shared(args.get(key) or "", what)
    for name, uri in (args.get("adapters") or {}).items():
        require_shared(uri, f"the adapter {name!r} (--adapter)")


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or stop "
                            "what uses it") from None


def app_args(config: ServeConfig, app_cfg: dict) -> dict:
    """The application's args: the Serve config's, with the command's model, storage, keys, judge and adapters; each
    URI checked now, with a clear error, rather than in a replica."""
    from emoji_ldm.inference.sampler import model_uri
    from emoji_ldm.store.artifacts import check_writable
    from emoji_ldm.store.uri import normalize_uri

    model = normalize_uri(config.model)
    model_uri(model)
    if config.sets_uri:
        check_writable(config.sets_uri)
    args = {**app_cfg.get("args", {}), "model": model, "sets_uri": normalize_uri(config.sets_uri)
            if config.sets_uri else ""}
    if config.jobs_uri:
        args["jobs_uri"] = check_writable(config.jobs_uri)
        args["job_num_gpus"] = config.gpus or args.get("job_num_gpus", 0)
        print(f"serve: jobs (POST /v1/jobs) keep their state and results under {args['jobs_uri']}; a job left "
              "unfinished by a stop resumes when it is next asked for (GET /v1/jobs/ID)", flush=True)
    if config.webhook_allow:
        args["webhook_allow"] = list(config.webhook_allow)
    if config.max_batch_size:
        args["max_batch_size"] = config.max_batch_size
    if not config.png_metadata:
        args["png_metadata"] = False
    if config.keys:
        from emoji_ldm.serve.keys import KeyRing

        ring = KeyRing(normalize_uri(config.keys))  # a clear error now for a missing or broken file
        args["keys"] = ring.uri
        print(f"serve: API keys from {ring.uri} ({ring.active} active): every /v1/ request needs one", flush=True)
    elif config.insecure:
        args["insecure"] = True
        print(f"serve: no API keys (--insecure): anyone who reaches {config.host}:{config.port} can generate",
              flush=True)
    else:
        print(f"serve: no API keys: anyone on this machine can generate at {config.host}:{config.port} (only "
              "requests for localhost are answered)", flush=True)
    if config.judge:
        args["judge"] = normalize_uri(config.judge)
    if args.get("judge"):
        from emoji_ldm.eval.judge import load_judge

        load_judge(args["judge"])  # a clear error now for a missing or broken judge, not in every replica
        print(f"serve: sets are measured by the judge {args['judge']} (legibility at chat size, consistency)",
              flush=True)
    if config.adapters:
        args["adapters"] = {**args.get("adapters", {}), **{k: normalize_uri(v) for k, v in config.adapters.items()}}
    return args


def _fit(deployments: list[dict], job_gpus: float) -> list[dict]:
    """`fit_gpus` on this cluster's GPUs now. Where GPU nodes may still join (`shared.most`: a declared
    $EMOJI_LDM_MAX_GPUS above what is up, or KubeRay's autoscaler with none declared), a misfit is a warning and
    nothing is lowered; elsewhere (this command's own Ray, a fixed cluster) what it sees is all there is."""
    from emoji_ldm.runtime.shared import MAX_ENV, most

    gpus = node_gpus()
    limit = most(sum(gpus), MAX_ENV["GPU"])
    grows = limit is None or limit > sum(gpus)
    try:
        fitted, note = fit_gpus(deployments, job_gpus, gpus)
    except UserError as e:
        if not grows:
            raise
        note = str(e)
    if note and grows:
        print(f"serve: warning: {note} (the GPUs up now; the cluster's autoscaler may add more)", flush=True)
        return deployments
    if note:
        print(f"serve: {note}", flush=True)
    return fitted


def start(config: ServeConfig) -> str:
    """Deploy the application and return its base URL once every replica is up."""
    from ray import serve

    from emoji_ldm.runtime.connect import ensure_ray
    from emoji_ldm.serve.app import AppArgs, application

    raw = load_serve_config(config.config or default_config_path())
    app_cfg = next(a for a in raw["applications"] if a["import_path"].startswith("emoji_ldm.serve.app:"))
    args = app_args(config, app_cfg)
    AppArgs(**args)
    _check_port_free(config.host, config.port)
    if config.gpus:
        args["device"] = "cuda"
    elif args.get("device") == "cuda":
        raise UserError("the Serve config asks for device: cuda but no GPU per replica: pass --gpus 1")
    ensure_ray(private=True)  # a Ray it starts itself needs Ray's token (runtime/connect.py)
    import ray

    check_shared(args)
    deployments, note = generator_resources(app_cfg.get("deployments"), config.gpus,
                                            ray.cluster_resources().get("GPU", 0))
    if note:
        print(f"serve: {note}", flush=True)
    deployments = _fit(deployments, args.get("job_num_gpus", 0) if args.get("jobs_uri") else 0)
    http = {**raw.get("http_options", {}), "host": config.host, "port": config.port}
    serve.start(http_options=http, proxy_location=raw.get("proxy_location", "EveryNode"))
    serve.run(application(args, deployments), name=app_cfg.get("name", APP_NAME),
              route_prefix=app_cfg.get("route_prefix", "/"))
    return f"http://{config.host}:{config.port}"


def serve_forever(config: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM, then shut Serve down cleanly."""
    from ray import serve

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        url = start(config)
        # again: ray.init installs its own SIGTERM handler, which aborts the process; a SIGTERM that
        # arrives before this line (while Serve starts) still does, so callers wait for "serving"
        signal.signal(signal.SIGTERM, _stop)
        docs = f"{url}/openapi.json, with a key" if config.keys else f"{url}/docs"
        print(f"serving {config.model} at {url}/  (API docs: {docs}; Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        import ray

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        print("serve: stopped", flush=True)

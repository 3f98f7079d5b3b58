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


def generator_resources(deployments: list[dict] | None, gpus: float, cluster_gpus: float) -> tuple[list, str | None]:
    """The Serve config's deployments with `--gpus` as the Generator's `num_gpus` (Ray hides GPUs from an actor
    that asks for none, so a replica without it runs on CPU even on a GPU node), and a start-up note when the
    cluster has GPUs that no replica asks for."""
    out = []
    for d in deployments or []:
        if d.get("name") == "Generator" and gpus:
            d = {**d, "ray_actor_options": {**d.get("ray_actor_options", {}), "num_gpus": gpus}}
        out.append(d)
    asked = any(d.get("ray_actor_options", {}).get("num_gpus") for d in out if d.get("name") == "Generator")
    note = None
    if cluster_gpus and not asked:
        note = (f"the cluster has {cluster_gpus:g} GPU(s) but the replicas ask for none, so they run on CPU: "
                "pass --gpus 1 to put each replica on a GPU")
    return out, note


GPU_UNIT = 10_000  # Ray counts resources in units of 0.0001


def check_gpu_share(name: str, gpus: float) -> None:
    """Ray's rule for a GPU request: a share of one GPU (below 1) or a whole number of GPUs."""
    if gpus > 1 and gpus != int(gpus):
        raise UserError(f"{name} {gpus:g}: Ray places a share of one GPU (below 1, e.g. 0.5) or whole GPUs, never "
                        f"{gpus:g}: pass {int(gpus)} or {int(gpus) + 1}")


def packs(demands: list[float], node_gpus: list[float]) -> bool:
    """Whether Ray can hold all these GPU requests at once on nodes with these GPUs: a share below 1 comes out of one
    GPU (the fullest it fits in), a whole number out of as many free GPUs of one node; largest first."""
    nodes = [[GPU_UNIT] * int(n) for n in node_gpus]  # per node, per GPU: the units still free
    for want in sorted((round(d * GPU_UNIT) for d in demands if d), reverse=True):
        if want < GPU_UNIT:
            room = [(free, n, i) for n, gpus in enumerate(nodes) for i, free in enumerate(gpus) if free >= want]
            if not room:
                return False
            _, n, i = min(room)
            nodes[n][i] -= want
            continue
        count = -(-want // GPU_UNIT)
        gpus = next((g for g in nodes if sum(free == GPU_UNIT for free in g) >= count), None)
        if gpus is None:
            return False
        for i in [i for i, free in enumerate(gpus) if free == GPU_UNIT][:count]:
            gpus[i] = 0
    return True


def replica_range(deployment: dict) -> tuple[int, int]:
    """(min, max) replicas of a Serve config deployment: `num_replicas`, or its autoscaling_config with Serve's
    defaults (1 and 1; `num_replicas: auto`: 1 and 100)."""
    n = deployment.get("num_replicas")
    if isinstance(n, int):
        return n, n
    scaling = {"min_replicas": 1, "max_replicas": 100 if n == "auto" else 1,
               **(deployment.get("autoscaling_config") or {})}
    return scaling["min_replicas"], scaling["max_replicas"]


def _gpus_text(node_gpus: list[float]) -> str:
    return f"{sum(node_gpus):g} GPU(s) on {sum(1 for n in node_gpus if n)} node(s)" if sum(node_gpus) else "no GPU"


def fitting_share(count: int, node_gpus: list[float]) -> float | None:
    """The largest GPU request (whole GPUs, else a share in hundredths) of which `count` fit these nodes at once."""
    wholes = [float(k) for k in range(int(max(node_gpus, default=0)), 0, -1)]
    shares = [int(100 / k) / 100 for k in range(2, 101)]
    return next((s for s in wholes + shares if packs([s] * count, node_gpus)), None)


def fit_gpus(deployments: list[dict], job_gpus: float, node_gpus: list[float]) -> tuple[list[dict], str | None]:
    """The deployments with the Generator's max_replicas lowered where need be, so that its replicas at their most
    and one job's drawer (`job_gpus`; 0: no jobs or CPU jobs) hold GPUs at once: a drawer Ray can never place
    leaves its job queued for ever, with no error. With a note when lowered; a one-line UserError when even
    min_replicas (at least 1) and a drawer cannot be placed."""
    gen = next((d for d in deployments if d.get("name") == "Generator"), {"name": "Generator"})
    share = gen.get("ray_actor_options", {}).get("num_gpus") or 0
    jobs = [job_gpus] if job_gpus else []
    if not share and not jobs:
        return deployments, None
    low, high = replica_range(gen)
    low = max(low, 1)
    fits = [n for n in range(low, high + 1) if packs([share] * n + jobs, node_gpus)]
    if fits and fits[-1] == high:
        return deployments, None
    drawer = f" + a job's drawer of {job_gpus:g} GPU" if jobs else ""
    if not fits:
        what = f"--gpus {share:g}" + (" with --jobs-uri" if jobs else "") if share else f"job_num_gpus {job_gpus:g}"
        hint = fitting_share(low + len(jobs), node_gpus)
        fix = (f"pass --gpus {hint:g} (the replicas and a job's drawer then share GPUs)" if hint else
               "pass --gpus 0 to serve on CPU, or give this Ray cluster a GPU")
        raise UserError(f"{what}: {low} Generator replica(s) x {share:g} GPU{drawer} cannot all be placed on this "
                        f"cluster's {_gpus_text(node_gpus)} (a job would stay queued for ever): {fix}")
    scaling = {**(gen.get("autoscaling_config") or {}), "max_replicas": fits[-1]}
    if scaling.get("initial_replicas") is not None:
        scaling["initial_replicas"] = min(scaling["initial_replicas"], fits[-1])
    capped = {**gen, "autoscaling_config": scaling}
    note = (f"the Generator scales to at most {fits[-1]} replica(s) here, not {high}: {high} x {share:g} GPU{drawer} "
            f"do not fit this cluster's {_gpus_text(node_gpus)}")
    return [capped if d is gen else d for d in deployments], note


def node_gpus() -> list[float]:
    """The GPUs of each alive node of the Ray cluster this process is connected to."""
    import ray

    return [float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]


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

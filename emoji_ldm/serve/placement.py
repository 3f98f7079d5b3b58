"""Where the service's actors live and how they are found, and how GPU requests are placed.

The service's own actors are detached and named, in one namespace, so that every ingress replica finds the same
ones: the meter (serve/meter.py), the job queue (serve/jobs/queue.py) and one runner per job
(serve/jobs/runner.py), named `job:<owner>:<job id>`. GPU requests follow Ray's rule (a share of one GPU, or whole
GPUs) and are checked against the nodes before anything starts (`emoji-ldm serve --gpus`).
"""

from __future__ import annotations

from emoji_ldm.errors import UserError

NAMESPACE = "emoji-ldm-jobs"
QUEUE_NAME = "emoji-ldm-queue-1"  # the name changes with the queue's methods, as the meter's does


def actor_name(owner: str, job_id: str) -> str:
    """A job's runner actor."""
    return f"job:{owner}:{job_id}"


def runner(owner: str, job_id: str):
    """The live runner actor of a job, or None."""
    import ray

    try:
        return ray.get_actor(actor_name(owner, job_id), namespace=NAMESPACE)
    except ValueError:
        return None


def live_runners() -> list[tuple[str, str]]:
    """(owner, job id) of every live runner actor."""
    import ray

    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor.get("name", "")
        if actor.get("namespace") == NAMESPACE and name.startswith("job:"):
            owner, _, job_id = name[len("job:"):].partition(":")
            found.append((owner, job_id))
    return found


def job_queue():
    """The job queue actor if one runs, else None (nothing is made)."""
    import ray

    try:
        return ray.get_actor(QUEUE_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def unfinished_jobs(owner: str) -> set[str]:
    """Job ids of this owner that have not ended: a live runner, or a place in the job queue."""
    import ray

    live = {job_id for who, job_id in live_runners() if who == owner}
    queue = job_queue()
    return live | (ray.get(queue.unfinished.remote(owner)) if queue is not None else set())


def job_slots(num_cpus: float, num_gpus: float) -> int:
    """`job_slots: 0`: as many job drawers as the cluster holds now (at least one)."""
    import ray

    have = ray.cluster_resources()
    if num_gpus > 0:
        return max(1, int(have.get("GPU", 0) // num_gpus))
    return max(1, int(have.get("CPU", 1) // num_cpus)) if num_cpus > 0 else 4


# --- GPUs -------------------------------------------------------------------------------------


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

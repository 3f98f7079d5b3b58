"""Training ranks where NCCL can use the hardware: the train RayJob's ranks share multi-GPU pods (one per node), so
NCCL between them takes NVLink / P2P and shared memory, not TCP over the pod network; every GPU pod that can host
ranks sets NCCL's interface and has a memory-backed /dev/shm.

What Ray Train does with such a pod is read from Ray 2.60 and checked on its public config: `use_gpu` gives each
rank one GPU (nothing else), and the placement group packs them onto as few nodes as fit (PACK)."""

from __future__ import annotations

import functools
import shlex

import pytest

from tests.k8s import K8S, by_kind, load, pod_templates, ray_cluster_spec, render

NCCL_ENV = {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "WARN"}


@functools.cache
def rendered_gpu() -> list[dict]:
    """The gpu overlay, rendered once for this module (read, never written)."""
    return render("gpu")


def gpus(group: dict) -> int:
    """The GPUs of one pod of a worker group (its Ray container's limit)."""
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def gpu_groups(doc: dict) -> list[dict]:
    return [g for g in ray_cluster_spec(doc).get("workerGroupSpecs", []) if gpus(g)]


def workers(job: dict) -> int:
    words = shlex.split(job["spec"]["entrypoint"])
    return int(words[words.index("--workers") + 1])


def train_jobs() -> dict[str, dict]:
    """The train RayJob as the base file has it and as the gpu overlay renders it."""
    (base,) = load(K8S / "base" / "rayjob.train.yaml")
    return {"base": base, "gpu overlay": by_kind(rendered_gpu(), "RayJob")["emoji-train"]}


def test_ray_train_gives_each_rank_one_gpu_and_packs_them():
    """What the manifests rely on: with `use_gpu` (runner.fit) a rank asks for one GPU and no CPU, and the
    ranks' bundles are packed, so a pod of N GPUs takes N ranks."""
    from ray.train import ScalingConfig

    factory = ScalingConfig(num_workers=4, use_gpu=True).as_placement_group_factory()
    assert factory.strategy == "PACK"
    assert [b for b in factory.bundles if b] == [{"GPU": 1}] * 4


@pytest.mark.parametrize("where", ["base", "gpu overlay"])
def test_train_ranks_per_pod_match_gpus_per_pod(where):
    job = train_jobs()[where]
    ranks = workers(job)
    (group,) = gpu_groups(job)
    per_pod = gpus(group)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], "a RayJob's cluster has a fixed size"
    assert per_pod * group["replicas"] == ranks, \
        f"{where}: --workers {ranks} but {group['replicas']} pods of {per_pod} GPUs: every rank needs a GPU, and " \
        "every GPU of the job a rank"
    assert ranks == 1 or per_pod > 1, \
        f"{where}: {ranks} ranks in {group['replicas']} pods of {per_pod} GPU: NCCL between pods goes over TCP " \
        "even on one node; give a pod every GPU of its node"
    assert "nvidia.com/gpu" not in str(pod_templates(job)["head"]), f"{where}: a rank could land on the head"


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_the_interactive_cluster_holds_the_train_jobs_ranks_in_one_pod(overlay):
    """`emoji-ldm submit train` with the RayJob's flags against the RayCluster: its ranks fit one GPU pod."""
    if overlay == "base":
        (cluster,) = load(K8S / "base" / "raycluster.emoji.yaml")
    else:
        cluster = by_kind(rendered_gpu(), "RayCluster")["emoji"]
    ranks = workers(train_jobs()["base"])
    (group,) = gpu_groups(cluster)
    assert gpus(group) >= ranks, \
        f"{overlay}: the RayCluster's GPU pods have {gpus(group)} GPUs: `submit train --workers {ranks} --gpu` " \
        "would spread its ranks over pods, and NCCL between them goes over TCP"


def gpu_pods() -> dict[str, dict]:
    """Every pod template that can host training ranks: the GPU groups of the train RayJob and the RayCluster."""
    jobs = train_jobs()
    docs = {"base RayJob": jobs["base"], "gpu RayJob": jobs["gpu overlay"],
            "base RayCluster": load(K8S / "base" / "raycluster.emoji.yaml")[0],
            "gpu RayCluster": by_kind(rendered_gpu(), "RayCluster")["emoji"]}
    return {f"{name} group {g['groupName']}": g["template"] for name, doc in docs.items() for g in gpu_groups(doc)}


def test_gpu_pods_set_nccl_and_a_memory_dev_shm():
    pods = gpu_pods()
    assert len(pods) == 4
    for where, template in pods.items():
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in NCCL_ENV} == NCCL_ENV, f"{where}: NCCL settings {env}"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{where}: no /dev/shm volume (NCCL's shared memory, Ray's object store)"
        volume = {v["name"]: v for v in template["spec"].get("volumes", [])}[mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory", f"{where}: /dev/shm is not in memory"

"""Checks that size by the cluster read what it may grow to, not only what is up now: on an autoscaling cluster
(GPU workers start at 0) a local --out is refused and DreamBooth's class actors are counted from the declared
maximum; the manifests declare that maximum on every head whose cluster can grow, or may start its job before its
workers are up.

No Ray here: the live cluster (`cluster_nodes`, `ray.cluster_resources`) is stood in for."""

from __future__ import annotations

import math

import pytest

from emoji_ldm.errors import UserError
from emoji_ldm.runtime import shared
from emoji_ldm.train.dreambooth_data import class_actor_count
from tests.k8s import K8S, by_kind, load, pod_templates, ray_cluster_spec, render

KUBERAY_AUTOSCALING_HEAD = "ray start --head --block --dashboard-host=0.0.0.0 --no-monitor --num-cpus=0"


@pytest.fixture
def cluster(monkeypatch):
    """A cluster that is the head alone now, with no CPUs or GPUs for work (KubeRay's head runs num-cpus 0)."""
    import ray

    for env in (shared.MAX_NODES_ENV, *shared.MAX_ENV.values(), shared.KUBERAY_START_ENV, shared.SHARED_PATHS_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(shared, "cluster_nodes", lambda: 1)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 0.0, "memory": 8e9})
    return monkeypatch


def test_a_local_out_is_refused_on_a_cluster_that_may_grow(cluster):
    cluster.setenv(shared.MAX_NODES_ENV, "11")
    with pytest.raises(UserError) as e:
        shared.require_shared("/tmp/run", "the run folder (--out)")
    assert str(e.value) == ("the run folder (--out) is the local path '/tmp/run', but this Ray cluster has 1 node now "
                            "and may grow to 11 ($EMOJI_LDM_MAX_NODES) and workers on the others cannot reach it: use "
                            "an s3:// URI, or list a filesystem every node mounts in $EMOJI_LDM_SHARED_PATHS")


def test_a_local_out_is_refused_under_kuberays_autoscaler_with_no_declared_maximum(cluster):
    cluster.setenv(shared.KUBERAY_START_ENV, KUBERAY_AUTOSCALING_HEAD)
    with pytest.raises(UserError, match=r"has 1 node now and an autoscaler that may add more \(\$EMOJI_LDM_MAX_NODES"):
        shared.require_shared("file:///tmp/run", "the run folder (--out)")


def test_a_local_out_is_fine_where_the_cluster_stays_one_node_or_the_path_is_shared(cluster):
    shared.require_shared("/tmp/run", "--out")  # the head alone, no autoscaler
    cluster.setenv(shared.KUBERAY_START_ENV, KUBERAY_AUTOSCALING_HEAD.replace(" --no-monitor", ""))
    shared.require_shared("/tmp/run", "--out")
    cluster.setenv(shared.MAX_NODES_ENV, "1")
    shared.require_shared("/tmp/run", "--out")
    cluster.setenv(shared.MAX_NODES_ENV, "11")
    cluster.setenv(shared.SHARED_PATHS_ENV, "/mnt/nfs")
    shared.require_shared("/mnt/nfs/run", "--out")
    shared.require_shared("s3://emoji-ldm/runs/x", "--out")
    cluster.setattr(shared, "cluster_nodes", lambda: 3)  # more nodes up than declared: what is up counts
    cluster.setenv(shared.MAX_NODES_ENV, "1")
    with pytest.raises(UserError, match="this Ray cluster has 3 nodes and workers"):
        shared.require_shared("/tmp/run", "--out")


def test_a_maximum_that_is_not_a_number_is_one_line(cluster):
    cluster.setenv(shared.MAX_NODES_ENV, "eleven")
    with pytest.raises(UserError, match=r"^\$EMOJI_LDM_MAX_NODES='eleven' is not a whole number: set it to the most"):
        shared.require_shared("/tmp/run", "--out")


def test_class_actors_count_from_the_gpus_the_cluster_may_grow_to(cluster):
    """DreamBooth --gpu on the autoscaling cluster: no GPU is up yet, the manifests declare 8."""
    cluster.setenv(shared.MAX_ENV["GPU"], "8")
    cluster.setenv(shared.MAX_ENV["CPU"], "128")
    assert class_actor_count(4, True, shared.max_resources()) == (4, None)
    assert class_actor_count(12, True, shared.max_resources()) == (8, "--class-actors 12 lowered to 8: the "
                                                                      "cluster has 8 GPUs")
    assert class_actor_count(4, False, shared.max_resources()) == (4, None)
    cluster.setenv(shared.MAX_ENV["GPU"], "0")
    with pytest.raises(UserError, match="no GPUs"):
        class_actor_count(1, True, shared.max_resources())


def test_class_actors_are_left_as_asked_under_an_autoscaler_with_no_declared_maximum(cluster):
    cluster.setenv(shared.KUBERAY_START_ENV, KUBERAY_AUTOSCALING_HEAD)
    assert shared.max_resources() is None
    assert class_actor_count(4, True, shared.max_resources()) == (
        4, "--class-actors 4 not checked: the cluster autoscales and $EMOJI_LDM_MAX_GPUS does not say how many "
           "GPUs it may have")


def test_without_an_autoscaler_or_a_maximum_the_live_cluster_counts(cluster):
    import ray

    cluster.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    assert shared.max_resources() == {"CPU": 16.0, "GPU": 2.0}
    assert class_actor_count(4, True, shared.max_resources()) == (2, "--class-actors 4 lowered to 2: the cluster "
                                                                     "has 2 GPUs")


# --- the manifests declare the maximum ----------------------------------------------------------------------


def quantity(value: str) -> int:
    """A Kubernetes CPU or GPU quantity as Ray counts it (KubeRay rounds a fraction up)."""
    return math.ceil(int(value[:-1]) / 1000) if value.endswith("m") else int(value)


def reachable(doc: dict) -> dict[str, str]:
    """What a Ray resource's groups can reach: nodes, and the CPUs and GPUs Ray sees (`ray start` flags first,
    else the Ray container's limits, as KubeRay writes them)."""
    spec = ray_cluster_spec(doc)
    groups = [(spec["headGroupSpec"], 1)] + [(g, g["maxReplicas"] * g.get("numOfHosts", 1))
                                             for g in spec.get("workerGroupSpecs", [])]
    nodes = cpus = gpus = 0
    for group, count in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        nodes += count
        cpus += count * quantity(params.get("num-cpus", limits["cpu"]))
        gpus += count * quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", "0")))
    return {shared.MAX_NODES_ENV: str(nodes), shared.MAX_ENV["CPU"]: str(cpus), shared.MAX_ENV["GPU"]: str(gpus)}


def declared(doc: dict) -> dict[str, str]:
    head = pod_templates(doc)["head"]["spec"]["containers"][0]
    names = {shared.MAX_NODES_ENV, *shared.MAX_ENV.values()}
    return {e["name"]: e["value"] for e in head.get("env", []) if e["name"] in names}


def test_heads_declare_what_their_cluster_may_grow_to():
    """Every autoscaling RayCluster (its GPU workers start at 0) and the train RayJob (its job may start before
    its GPU pod is up) declare their maximum on the head, and it is what their groups can reach."""
    docs = {"base": [d for p in sorted((K8S / "base").glob("ray*.yaml")) for d in load(p)],
            "local": render("local"), "gpu": render("gpu")}
    seen = 0
    for where, found in docs.items():
        for doc in (d for d in found if d["kind"] in ("RayCluster", "RayJob", "RayService")):
            name = f"{where}: {doc['kind']}/{doc['metadata']['name']}"
            must = (doc["kind"] == "RayCluster" and ray_cluster_spec(doc).get("enableInTreeAutoscaling")) or \
                (doc["kind"] == "RayJob" and doc["metadata"]["name"] == "emoji-train")
            have = declared(doc)
            if must or have:
                assert have == reachable(doc), f"{name}: the head declares {have}, its groups reach {reachable(doc)}"
                seen += 1
    assert seen == 6
    gpu_cluster = declared(by_kind(docs["gpu"], "RayCluster")["emoji"])
    assert int(gpu_cluster[shared.MAX_NODES_ENV]) > 1 and int(gpu_cluster[shared.MAX_ENV["GPU"]]) >= 4

"""The service survives its head and starts replicas fast: the RayService keeps its GCS state in Redis (KubeRay's
`gcsFaultToleranceOptions`), only the service's pods reach that Redis, and a DaemonSet keeps the GPU image on every
GPU node; pods load hub weights from our own storage only (HF_HUB_OFFLINE)."""

from __future__ import annotations

import subprocess

import pytest

from tests.k8s import K8S, by_kind, every_pod_template, pod_templates, ray_cluster_spec, render
from tests.unit.test_cluster_blockers import NODES, fake_kubectl, lands_on
from tests.unit.test_cluster_zones import ingress_allowed, ray_pod, sources


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_rayservice_keeps_its_gcs_in_redis(overlay):
    docs = render(overlay)
    cluster = ray_cluster_spec(by_kind(docs, "RayService")["emoji"])
    ft = cluster.get("gcsFaultToleranceOptions")
    assert ft, f"{overlay}: no GCS fault tolerance: a head crash takes every replica and job runner down"
    host, port = ft["redisAddress"].split(":")
    service = by_kind(docs, "Service")[host]
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    (redis,) = [d for d in docs if d["kind"] == "Deployment" and
                d["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()]
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    env = {e["name"]: e for e in redis["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret, "Redis and the head disagree on the password"
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    admitted = {name for name, src in sources().items() if ingress_allowed(policies, redis_labels, src, int(port))}
    assert admitted == {"service ray pod"}, f"{overlay}: Redis admits {sorted(admitted)}"
    assert ingress_allowed(policies, redis_labels, {"labels": ray_pod("service", "head")}, int(port))


def test_secrets_sh_makes_redis_password(tmp_path):
    env, log = fake_kubectl(tmp_path)
    r = subprocess.run([str(K8S / "secrets.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert any("create secret generic emoji-ldm-redis --from-literal=password=" in line
               for line in log.read_text().splitlines())


def test_gpu_image_is_pulled_onto_every_gpu_node_ahead_of_replicas():
    docs = render("gpu")
    (daemonset,) = by_kind(docs, "DaemonSet").values()
    template = daemonset["spec"]["template"]
    gpu_images = {c["image"] for t in pod_templates(by_kind(docs, "RayService")["emoji"]).values()
                  for c in t["spec"]["containers"] if "emoji-ldm-gpu" in c["image"]}
    assert {c["image"] for c in template["spec"]["containers"]} == gpu_images
    assert {name for name, node in NODES.items() if lands_on(template, node)} == {"gpu"}
    assert not any("nvidia.com/gpu" in str(c["resources"]) for c in template["spec"]["containers"]), \
        "the pre-pull pod must not hold a GPU"
    assert "DaemonSet" not in {d["kind"] for d in render("local")}, "kind has no GPU nodes"


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_no_pod_downloads_from_the_hub(overlay):
    """Weights come from our own storage (`python -m emoji_ldm.store.mirror`): the hub is never asked at run time."""
    for doc in render(overlay):
        for place, template in every_pod_template(doc).items():
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                if "emoji-ldm" not in c["image"]:
                    continue
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("HF_HUB_OFFLINE") == "1", f"{overlay} {doc['metadata']['name']} {place}: {c['name']}"

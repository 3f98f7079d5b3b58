"""The Kueue overlay (k8s/overlays/kueue): it renders with `kubectl kustomize`, every Kueue object validates against
Kueue's own CRD schemas (v1beta2, vendored from kubernetes-sigs/kueue in tests/unit/kueue_crd_schemas.json), and
the queues say what docs/cluster.md promises: every RayJob in a LocalQueue with a priority, bulk > data > train, the
service's pods above every job's, and a GPU quota that leaves the RayService's peak outside it."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema
import pytest

from tests.k8s import by_kind, pod_templates, ray_cluster_spec, render

SCHEMAS = json.loads((Path(__file__).parent / "kueue_crd_schemas.json").read_text())
KUEUE = "kueue.x-k8s.io"
CLUSTER_GPUS = 16  # the cluster docs/cluster.md makes: 2 nodes of 8 GPUs


@functools.cache
def kueue() -> list[dict]:
    return render("kueue")


def strict(value, schema: dict, where: str) -> None:
    """What the API server would prune silently: a field the schema does not know is a typo here."""
    if isinstance(value, dict) and "properties" in schema and "additionalProperties" not in schema:
        unknown = set(value) - set(schema["properties"]) - ({"metadata"} if where == "" else set())
        assert not unknown, f"unknown fields {sorted(unknown)} at {where or '.'}"
        for key, sub in value.items():
            if key in schema["properties"]:
                strict(sub, schema["properties"][key], f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            strict(item, schema["items"], f"{where}[{i}]")


def test_vendored_schemas_are_kueues_v1beta2():
    assert SCHEMAS["apiVersion"] == f"{KUEUE}/v1beta2" and "kubernetes-sigs/kueue" in SCHEMAS["source"]
    assert set(SCHEMAS["schemas"]) == {"ClusterQueue", "LocalQueue", "ResourceFlavor", "WorkloadPriorityClass"}


def test_kueue_overlay_validates_against_kueues_crds():
    docs = [d for d in kueue() if d["apiVersion"].startswith(f"{KUEUE}/")]
    assert {d["kind"] for d in docs} == set(SCHEMAS["schemas"])
    for doc in docs:
        assert doc["apiVersion"] == SCHEMAS["apiVersion"], doc["apiVersion"]
        schema = SCHEMAS["schemas"][doc["kind"]]
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            jsonschema.validate(doc, schema)
        except jsonschema.ValidationError as e:
            pytest.fail(f"{where}: {e.message} at {list(e.path)}")
        strict(doc, schema, "")
        assert doc["metadata"]["labels"]["emoji-ldm/component"] == "store"
        if doc["kind"] == "LocalQueue":
            assert doc["metadata"]["namespace"] == "emoji-ldm", where
        else:  # cluster-scoped
            assert "namespace" not in doc["metadata"], where


def test_validation_catches_a_bad_queue():
    schema = SCHEMAS["schemas"]["ClusterQueue"]
    bad = {"apiVersion": f"{KUEUE}/v1beta2", "kind": "ClusterQueue", "metadata": {"name": "x"},
           "spec": {"resourceGroups": [{"coveredResources": ["cpu"], "flavors": [{"name": "f", "resources": [
               {"name": "cpu"}]}]}]}}
    with pytest.raises(jsonschema.ValidationError, match="nominalQuota"):
        jsonschema.validate(bad, schema)
    typo = {**bad, "spec": {"preemptoin": {}}}
    with pytest.raises(AssertionError, match="preemptoin"):
        strict(typo, schema, "")


def test_every_rayjob_queues_with_a_priority_and_bulk_outranks_data_outranks_train():
    docs = kueue()
    queues = {d["metadata"]["name"]: d for d in docs if d["kind"] == "LocalQueue"}
    priorities = {d["metadata"]["name"]: d["value"] for d in docs if d["kind"] == "WorkloadPriorityClass"}
    cluster_queues = by_kind(docs, "ClusterQueue")
    for job in by_kind(docs, "RayJob").values():
        labels = job["metadata"]["labels"]
        queue = labels.get(f"{KUEUE}/queue-name")
        assert queue in queues, f"{job['metadata']['name']}: queue {queue!r} is not a LocalQueue here"
        assert queues[queue]["spec"]["clusterQueue"] in cluster_queues
        assert labels.get(f"{KUEUE}/priority-class") in priorities, job["metadata"]["name"]
        # Kueue admits a RayJob's cluster as one workload (gang): it must be a fixed size, its own, and go away
        cluster = ray_cluster_spec(job)
        assert not cluster.get("enableInTreeAutoscaling") and "clusterSelector" not in job["spec"]
        assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert priorities["emoji-ldm-bulk"] > priorities["emoji-ldm-data"] > priorities["emoji-ldm-train"]


def quantity(value) -> float:
    text = str(value)
    units = {"Gi": 2**30, "Mi": 2**20, "m": 1e-3}
    for unit, scale in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def requests(doc: dict) -> dict[str, float]:
    """What a Ray resource asks for at its largest: every pod set at its maxReplicas (RayJobs: replicas)."""
    total: dict[str, float] = {}
    spec = ray_cluster_spec(doc)
    counts = {"head": 1, "submitter": 1} | {f"worker group {g['groupName']}": g.get("maxReplicas", g["replicas"])
                                             for g in spec.get("workerGroupSpecs", [])}
    for place, template in pod_templates(doc).items():
        for c in template["spec"]["containers"]:
            for name, value in c["resources"]["requests"].items():
                total[name] = total.get(name, 0) + counts[place] * quantity(value)
    return total


def test_the_batch_quota_leaves_the_services_peak_and_fits_every_job():
    docs = kueue()
    (queue,) = by_kind(docs, "ClusterQueue").values()
    quota = {r["name"]: quantity(r["nominalQuota"]) for g in queue["spec"]["resourceGroups"]
             for f in g["flavors"] for r in f["resources"]}
    service = by_kind(docs, "RayService")["emoji"]
    assert f"{KUEUE}/queue-name" not in service["metadata"].get("labels", {}), "an autoscaling RayService is not queued"
    assert quota["nvidia.com/gpu"] + requests(service)["nvidia.com/gpu"] == CLUSTER_GPUS
    for job in by_kind(docs, "RayJob").values():
        need = requests(job)
        assert all(need.get(k, 0) <= quota[k] for k in quota), f"{job['metadata']['name']} never fits: {need}"


def test_the_services_pods_outrank_every_job_pod():
    docs = kueue()
    classes = by_kind(docs, "PriorityClass")
    for place, template in pod_templates(by_kind(docs, "RayService")["emoji"]).items():
        name = template["spec"].get("priorityClassName")
        assert name in classes and classes[name]["value"] > 0, f"service {place}: priority {name!r}"
    for job in by_kind(docs, "RayJob").values():
        for template in pod_templates(job).values():
            assert "priorityClassName" not in template["spec"]

"""Reading the manifests in k8s/: the raw files, and overlays rendered with `kubectl kustomize`."""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from tests.conftest import REPO

K8S = REPO / "k8s"
OVERLAYS = ("local", "gpu")
PINS = "images.pinned"  # the gpu overlay's record of its pinned digests (infra/build_push.sh writes it)
# a stand-in for what infra/build_push.sh records, so the gpu overlay (and those built on it) render in the tests
TEST_PINS = "emoji-ldm=registry.example.com/emoji-ldm@sha256:" + "1" * 64 + "\n"
IMAGE_CHECKOUT = "/home/ray/emoji-ldm"  # where infra/Dockerfile puts the checkout (the RayJobs' working_dir)


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml"))


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise RuntimeError("kubectl is not installed: `make test` installs it (Debian's kubernetes-client)")
    return path


def kustomize(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)


@functools.cache
def pinned_copy() -> Path:
    """A copy of k8s/ as it is once `infra/build_push.sh` has pinned the gpu overlay's images: the checkout's gpu
    overlay refuses to render until then (it needs its pins file), so the tests render this copy."""
    root = Path(tempfile.mkdtemp(prefix="emoji-ldm-k8s-")) / "k8s"
    atexit.register(shutil.rmtree, root.parent, True)
    shutil.copytree(K8S, root)
    (root / "overlays" / "gpu" / PINS).write_text(TEST_PINS)
    return root


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize k8s/overlays/OVERLAY` (of the pinned copy), parsed."""
    out = kustomize(pinned_copy() / "overlays" / overlay)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]


def every_doc() -> list[dict]:
    """Every manifest file's documents, and the local and gpu overlays rendered."""
    return [d for p in manifest_files() for d in load(p)] + render("local") + render("gpu")


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def ray_cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


def pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template in a Ray custom resource, by where it sits."""
    spec = ray_cluster_spec(doc)
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        templates[f"worker group {group['groupName']}"] = group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        templates["submitter"] = doc["spec"]["submitterPodTemplate"]
    return templates


def every_pod_template(doc: dict) -> dict[str, dict]:
    """Every pod template of a document, by where it sits: a Ray resource's (`pod_templates`), or a workload's
    `spec.template` (StatefulSet, Deployment, Job); {} for a kind that makes no pods."""
    if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
        return pod_templates(doc)
    if doc["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
        return {"template": doc["spec"]["template"]}
    if doc["kind"] == "CronJob":
        return {"template": doc["spec"]["jobTemplate"]["spec"]["template"]}
    return {}

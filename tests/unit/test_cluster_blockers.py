"""What stops a first run on a managed cluster (EKS, GKE) before a model and an endpoint: the image, the pins of
its digests, the MinIO volume, where CPU pods may schedule, and cloud identity. Read from k8s/, infra/ and
.dockerignore, and the gpu overlay rendered with `kubectl kustomize`, as the cluster would get it."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.k8s import K8S, PINS, by_kind, every_pod_template, kustomize, load, ray_cluster_spec, render

DOCKERFILE = REPO / "infra" / "Dockerfile"
BUILD_PUSH = REPO / "infra" / "build_push.sh"
CPU_POOL = {"emoji-ldm/pool": "cpu"}  # the label of the documented CPU node pool (docs/cluster.md)
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}  # GKE's, and ours on EKS
STORAGE_CLASS = "emoji-ldm-minio"


def pods(docs: list[dict]) -> dict[str, dict]:
    """Every pod template of the documents, named `Kind/name place`."""
    return {f"{d['kind']}/{d['metadata']['name']} {place}": t for d in docs
            for place, t in every_pod_template(d).items()}


def gpu_request(template: dict) -> bool:
    return any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in template["spec"]["containers"])


# --- the image ---------------------------------------------------------------------------------------


def test_gpu_overlay_refuses_to_render_until_its_images_are_pinned():
    """The checkout's gpu overlay holds all-zero placeholder digests: it must not render (so nothing applies an image
    no registry has) until `infra/build_push.sh REGISTRY` has written real digests and the pins file."""
    entries = load(K8S / "overlays" / "gpu" / "kustomization.yaml")[0]["images"]
    if not (K8S / "overlays" / "gpu" / PINS).exists():
        assert any(set(e["digest"].removeprefix("sha256:")) == {"0"} for e in entries)
        out = kustomize(K8S / "overlays" / "gpu")
        assert out.returncode != 0, "the gpu overlay renders with all-zero placeholder digests"
        assert PINS in out.stderr, f"the failure does not name {PINS}: {out.stderr}"
    else:  # pinned and committed: every digest is a real one
        assert not any(set(e["digest"].removeprefix("sha256:")) == {"0"} for e in entries)
    script = BUILD_PUSH.read_text()
    # the pins file is written after every image is pinned, never before
    assert script.index('"$pins"') > script.index("pin \"${ref%%:*}\"") and f"/{PINS}" in script
    assert PINS in (REPO / "docs" / "cluster.md").read_text()


def gpu_build() -> tuple[str, str]:
    """The torch index and CUDA version that infra/build_push.sh builds the GPU image with."""
    m = re.search(r"^\s*build py311-gpu (\S+) ?(\S*)$", BUILD_PUSH.read_text(), re.M)
    assert m, "infra/build_push.sh builds no py311-gpu image"
    return m.group(1), m.group(2)


def test_gpu_image_pins_torchs_cuda_build_and_docs_state_the_driver_floor():
    index, checked = gpu_build()
    m = re.fullmatch(r'"?https://download\.pytorch\.org/whl/cu(\d+)(\d)"?', index)
    assert m, f"the GPU image takes torch from {index!r}: pin a CUDA build (https://download.pytorch.org/whl/cuXYZ)"
    cuda = f"{m.group(1)}.{m.group(2)}"
    text = DOCKERFILE.read_text()
    assert "torch.version.cuda" in text, "the image build does not check the CUDA build of the torch it installed"
    assert checked == cuda, f"the GPU build takes torch from {index} but checks for CUDA {checked!r}"
    assert '--build-arg TORCH_CUDA="${3:-}"' in BUILD_PUSH.read_text()
    doc = (REPO / "docs" / "cluster.md").read_text()
    assert re.search(rf"CUDA {re.escape(cuda)}\b[^.]*driver[^.]*\b\d{{3}}\.\d+", doc), \
        f"docs/cluster.md does not state the NVIDIA driver floor of CUDA {cuda}"


def apt_packages(dockerfile: str) -> set[str]:
    words = set()
    for m in re.finditer(r"apt-get install ([^&]*)", dockerfile):
        words |= {w for w in m.group(1).replace("\\", " ").split() if not w.startswith("-")}
    return words


def test_image_has_the_c_compiler_that_compile_true_needs():
    """The RayService sets compile: true; torch.compile's Triton builds its launcher with a C compiler (and
    Inductor's CPU code a C++ one)."""
    service = yaml.safe_load(by_kind(render("gpu"), "RayService")["emoji"]["spec"]["serveConfigV2"])
    assert service["applications"][0]["args"]["compile"] is True
    assert apt_packages(DOCKERFILE.read_text()) & {"g++", "gcc", "build-essential"}, \
        "the image installs no C compiler"


def _pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `**` any number of folders, `*` and `?` inside one name."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's rules leave `path` out of the build context: the last rule that matches the path, or
    a folder above it, wins; `!` takes a path back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for rule in patterns:
        negate = rule.startswith("!")
        regex = _pattern(rule.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_matcher():
    rules = ["tests/*", "!tests/tiny_models.py", "**/__pycache__"]
    assert dockerignored("tests/conftest.py", rules) and not dockerignored("tests/tiny_models.py", rules)
    assert dockerignored("emoji_ldm/__pycache__/x.pyc", rules) and not dockerignored("emoji_ldm/x.py", rules)


def local_imports(path: Path) -> set[str]:
    """The modules of this repository that a file imports (`tests.x`, `emoji_ldm...`, `gpu_check.x`), at any depth."""
    ours, names = ("tests", "emoji_ldm", "gpu_check"), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] in ours}
    return names


def test_gpu_check_is_in_the_image_with_what_it_imports():
    """`python gpu_check/run.py` runs inside the image: the Dockerfile copies it and the test helpers it imports,
    and .dockerignore keeps them in the build context."""
    text = DOCKERFILE.read_text()
    copied = {w.rstrip("/") for m in re.finditer(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M) for w in m.group(1).split()}
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    needed, todo = set(), [REPO / "gpu_check" / "run.py"]
    while todo:
        path = todo.pop()
        rel = path.relative_to(REPO).as_posix()
        if rel in needed:
            continue
        needed.add(rel)
        for module in local_imports(path):
            if module.startswith(("tests", "gpu_check")):
                todo.append(REPO / (module.replace(".", "/") + ".py"))
    needed.add("tests/__init__.py")
    for rel in sorted(needed):
        assert any(rel == c or rel.startswith(c + "/") for c in copied), f"infra/Dockerfile does not copy {rel}"
        assert not dockerignored(rel, rules), f".dockerignore leaves {rel} out of the image"
    assert dockerignored("tests/conftest.py", rules), "the rest of tests/ stays out of the image"


# --- storage, scheduling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_minio_volume_names_its_storage_class(overlay):
    """A fresh EKS cluster has no default StorageClass: a PVC without one stays Pending."""
    (pvc,) = by_kind(render(overlay), "PersistentVolumeClaim").values()
    name = pvc["spec"].get("storageClassName")
    assert name, f"{overlay}: the MinIO PVC names no storageClassName"
    if overlay == "gpu":
        classes = {d["metadata"]["name"]: d for p in sorted((K8S / "storageclasses").glob("*.yaml")) for d in load(p)}
        assert set(classes) == {f"{STORAGE_CLASS}"} or all(n == name for n in classes), classes
        provisioners = {d["provisioner"] for p in (K8S / "storageclasses").glob("*.yaml") for d in load(p)}
        assert {"ebs.csi.aws.com", "pd.csi.storage.gke.io"} <= provisioners, provisioners


def tolerates(template: dict, taint: dict) -> bool:
    for t in template["spec"].get("tolerations", []):
        if t.get("effect") not in (None, taint["effect"]):
            continue
        if t.get("operator") == "Exists" and t.get("key") in (None, taint["key"]):
            return True
        if t.get("key") == taint["key"] and t.get("value") == taint["value"]:
            return True
    return False


def lands_on(template: dict, node: dict) -> bool:
    """Whether the scheduler may put the pod on the node: taints, nodeSelector, required node affinity, GPUs."""
    spec = template["spec"]
    if not all(tolerates(template, t) for t in node["taints"]):
        return False
    if any(node["labels"].get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (spec.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms"))
    if required and not any(all(node["labels"].get(e["key"]) in e.get("values", [node["labels"].get(e["key"])])
                                and e["key"] in node["labels"] for e in term["matchExpressions"]) for term in required):
        return False
    return node["gpus"] > 0 or not gpu_request(template)


# a managed cluster as docs/cluster.md makes it: a CPU pool (labelled) and a GPU pool (tainted, as GKE does)
NODES = {"cpu": {"labels": {**CPU_POOL}, "taints": [], "gpus": 0},
         "gpu": {"labels": {"nvidia.com/gpu.present": "true"}, "taints": [GPU_TAINT], "gpus": 8}}


@pytest.mark.parametrize("overlay", ["gpu"])
def test_every_pod_schedules_on_a_cpu_pool_beside_tainted_gpu_nodes(overlay):
    for where, template in pods(render(overlay)).items():
        landing = {name for name, node in NODES.items() if lands_on(template, node)}
        if gpu_request(template) or where.startswith("DaemonSet/"):
            assert landing == {"gpu"}, f"{where}: lands on {landing or 'no node'}"
        else:
            assert landing == {"cpu"}, f"{where}: a CPU pod lands on {landing or 'no node'}"
            assert template["spec"].get("nodeSelector") == CPU_POOL, \
                f"{where}: a CPU pod does not select the CPU pool ({CPU_POOL}): it may take a GPU node's CPUs"


# --- cloud identity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_every_pod_has_a_service_account_of_its_own_workload(overlay):
    docs = render(overlay)
    accounts = by_kind(docs, "ServiceAccount")
    for where, template in pods(docs).items():
        name = template["spec"].get("serviceAccountName")
        assert name, f"{overlay} {where}: no serviceAccountName (IRSA, Pod Identity and Workload Identity attach there)"
        assert name in accounts, f"{overlay} {where}: ServiceAccount {name} is not in the overlay"
    for doc in docs:  # the Ray autoscaler (the head's sidecar) is the only one that talks to the Kubernetes API
        if doc["kind"] in ("RayCluster", "RayService", "RayJob"):
            cluster = ray_cluster_spec(doc)
            head = cluster["headGroupSpec"]["template"]["spec"]
            assert head.get("automountServiceAccountToken") is bool(cluster.get("enableInTreeAutoscaling")), \
                f"{doc['metadata']['name']}: the head mounts an API token it does not need (or lacks the autoscaler's)"
    for where, template in pods(docs).items():
        if " head" not in where:
            assert template["spec"].get("automountServiceAccountToken") is False, f"{where}: mounts an API token"


def test_no_credentials_travel_in_a_runtime_env():
    """A job's runtime_env shows in its job info and is copied into every worker: a session token expires there."""
    for doc in render("gpu") + render("local"):
        if doc["kind"] == "RayJob":
            env = (yaml.safe_load(doc["spec"].get("runtimeEnvYAML", "")) or {}).get("env_vars", {})
            assert not [k for k in env if re.search(r"AWS_|TOKEN|SECRET|PASSWORD", k)], doc["metadata"]["name"]
        if doc["kind"] == "RayService":
            config = yaml.safe_load(doc["spec"]["serveConfigV2"])
            assert "env_vars" not in yaml.safe_dump(config), "serveConfigV2 sets env_vars"


def fake_kubectl(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A kubectl on PATH that finds nothing and logs every call (one line each), for k8s/secrets.sh."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    script = f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\ncase "$*" in *" get "*) exit 1;; esac\n'
    (bin_dir / "kubectl").write_text(script)
    (bin_dir / "kubectl").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def test_secrets_sh_on_aws_creates_no_static_keys(tmp_path):
    """`k8s/secrets.sh --s3 aws REGION`: the pods' S3 settings name the region only; the credentials come from the
    cloud (IRSA / Pod Identity on the workloads' ServiceAccounts); no MinIO root user."""
    env, log = fake_kubectl(tmp_path)
    r = subprocess.run([str(K8S / "secrets.sh"), "--s3", "aws", "us-west-2"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    creates = [line for line in log.read_text().splitlines() if "create secret" in line]
    s3 = [line for line in creates if "emoji-ldm-s3-" in line]
    assert len(s3) == 4 and all("AWS_REGION=us-west-2" in line for line in s3), creates
    assert not any("AWS_SECRET_ACCESS_KEY" in line or "AWS_ACCESS_KEY_ID" in line for line in creates), creates
    assert not any("emoji-ldm-minio-root" in line for line in creates), creates

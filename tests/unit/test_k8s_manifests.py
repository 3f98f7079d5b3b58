"""The manifests in k8s/ and the image in infra/: they parse, validate against the Kubernetes schemas
(`kubernetes-validate`), render with `kubectl kustomize`, and agree with the code they run.

KubeRay's own CRD schemas are not vendored; the Ray custom resources are checked field by field
against KubeRay's v1 API (the fields below), and every pod template inside them validates as a
core PodTemplate. And what makes them safe to apply: no secret value committed (k8s/secrets.sh makes them,
never over an existing one), NetworkPolicies around Ray's ports and MinIO, every pod without root, privilege
escalation or capabilities, and the gpu overlay's images pinned by digest.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib

import kubernetes_validate
import pytest
import yaml

from emoji_ldm.cli.submit import STAGES, check_stage_args
from emoji_ldm.runtime.connect import DAEMON_MALLOC_CONF, TASK_EVENTS_ENV, TASK_EVENTS_IN_GCS
from tests.conftest import REPO, VENV_BIN
from tests.k8s import (
    IMAGE_CHECKOUT,
    K8S,
    OVERLAYS,
    by_kind,
    every_doc,
    every_pod_template,
    load,
    manifest_files,
    pod_templates,
    ray_cluster_spec,
    render,
)

K8S_VERSION = kubernetes_validate.latest_version()
CORE_KINDS = {"Namespace", "Secret", "ConfigMap", "PersistentVolumeClaim", "Service", "StatefulSet", "Job",
              "NetworkPolicy", "ServiceAccount", "Deployment", "DaemonSet"}
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
PIPELINE_STAGES = ("build", "crawl", "caption", "encode", "train", "bulk")
# KubeRay ray.io/v1 fields (ray-operator/apis/ray/v1/*_types.go)
RAYJOB_FIELDS = {"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                 "activeDeadlineSeconds", "backoffLimit", "submitterPodTemplate", "submitterConfig",
                 "submissionMode", "rayClusterSpec", "clusterSelector", "entrypointNumCpus", "entrypointNumGpus",
                 "entrypointResources", "jobId", "metadata", "suspend", "managedBy", "deletionStrategy"}
CLUSTER_FIELDS = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                  "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions",
                  "authOptions"}
SERVICE_FIELDS = {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService",
                  "excludeHeadPodFromServeSvc", "deploymentUnhealthySecondThreshold",
                  "serviceUnhealthySecondThreshold"}
GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                "numOfHosts", "scaleStrategy", "suspend", "idleTimeoutSeconds"}
HEAD_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
OUR_IMAGE = re.compile(r"(?:^|/)emoji-ldm(?:-gpu)?[:@]")  # emoji-ldm (CPU) and emoji-ldm-gpu, by tag or digest
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
RAY_NODE = {"ray.io/is-ray-node": "yes"}  # the label KubeRay gives every Ray pod
RAY_PORTS = {"GCS": 6379, "dashboard": 8265, "client": 10001}
# values that were committed once, or ship as defaults: none may be in k8s/ or infra/
KNOWN_SECRETS = ("change-me", "minioadmin", "minio123")


def ours(image: str) -> bool:
    return bool(OUR_IMAGE.search(image))


def pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray\[[^]]*\]==([0-9.]+)", d))]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly (ray[...]==X.Y.Z), found {deps}"
    return pins[0]


def dockerfile_ray_version() -> str:
    m = re.search(r"^ARG RAY_VERSION=([0-9.]+)$", (REPO / "infra" / "Dockerfile").read_text(), re.M)
    assert m, "infra/Dockerfile has no `ARG RAY_VERSION=X.Y.Z`"
    return m.group(1)


def validate_core(doc: dict, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} is not valid Kubernetes {K8S_VERSION}: "
                    f"{e.message} at {list(e.path)}")


def containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def check_resources(resources: dict, where: str) -> None:
    for part in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(resources.get(part, {}))
        assert not missing, f"{where}: no {part} for {', '.join(sorted(missing))}"


def check_ray_resource(doc: dict, where: str) -> None:
    name = f"{where}: {doc['kind']}/{doc['metadata']['name']}"
    spec, cluster = doc["spec"], ray_cluster_spec(doc)
    allowed = {"RayJob": RAYJOB_FIELDS, "RayService": SERVICE_FIELDS, "RayCluster": CLUSTER_FIELDS}[doc["kind"]]
    assert set(spec) <= allowed, f"{name}: unknown spec fields {set(spec) - allowed}"
    assert set(cluster) <= CLUSTER_FIELDS, f"{name}: unknown cluster fields {set(cluster) - CLUSTER_FIELDS}"
    assert set(cluster["headGroupSpec"]) <= HEAD_FIELDS, name
    assert cluster["rayVersion"] == pinned_ray_version(), f"{name}: rayVersion {cluster['rayVersion']!r}"
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        assert set(group) <= GROUP_FIELDS | HEAD_FIELDS, f"{name}: unknown group fields"
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values must be strings"
    for group in cluster.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}: {group['groupName']}"
    if cluster.get("enableInTreeAutoscaling"):
        check_resources(cluster["autoscalerOptions"]["resources"], f"{name} autoscaler")
    for place, template in pod_templates(doc).items():
        validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                      f"{name} {place}")
        for c in containers(template):
            check_resources(c.get("resources", {}), f"{name} {place} container {c['name']}")
            gpus = c["resources"]["limits"].get("nvidia.com/gpu")
            if gpus is not None:
                assert c["resources"]["requests"].get("nvidia.com/gpu") == gpus, f"{name} {place}: GPU request"
                tolerations = template["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{name} {place}: no toleration"
            if ours(c["image"]) and place != "submitter":
                assert any(e.get("secretRef", {}).get("name", "").startswith("emoji-ldm-s3-")
                           for e in c.get("envFrom", [])), \
                    f"{name} {place}: S3 settings must come from its zone's emoji-ldm-s3-ZONE Secret"
    if doc["kind"] == "RayJob":
        check_rayjob(doc, name)
    # the head's GCS keeps the task events of as many tasks as a local run's (it grew with the tasks)
    head_env = {e["name"]: e.get("value") for e in containers(pod_templates(doc)["head"])[0].get("env", [])}
    assert head_env.get(TASK_EVENTS_ENV) == str(TASK_EVENTS_IN_GCS), f"{name} head: {TASK_EVENTS_ENV} not set"
    auth = cluster.get("authOptions", {})
    assert auth.get("mode") == "token" and auth.get("secretName", "").startswith("emoji-ldm-ray-token-"), \
        f"{name}: Ray token authentication must be on, with its zone's emoji-ldm-ray-token-ZONE Secret"
    if doc["kind"] == "RayService":
        check_serve_config(spec["serveConfigV2"], name)
        args = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
        assert args["keys"].startswith("/etc/emoji-ldm/keys/"), f"{name}: the service must have API keys"
        for place, template in pod_templates(doc).items():  # every pod a replica may run in has the file
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            assert volumes.get("api-keys", {}).get("secret") == {"secretName": "emoji-ldm-api-keys"}, \
                f"{name} {place}: no api-keys volume of the emoji-ldm-api-keys Secret"
            assert {"name": "api-keys", "mountPath": "/etc/emoji-ldm/keys", "readOnly": True} in \
                containers(template)[0].get("volumeMounts", []), f"{name} {place}: the keys are not mounted"


def check_rayjob(doc: dict, name: str) -> None:
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, name
    stage = doc["metadata"]["labels"]["emoji-ldm/stage"]
    assert spec["metadata"] == {"emoji_ldm_stage": stage}, f"{name}: metadata"
    words = shlex.split(spec["entrypoint"])
    script = STAGES[stage].script
    assert words[:2] == ["python", f"ray_jobs/{script}"], f"{name}: entrypoint {spec['entrypoint']!r}"
    assert (REPO / "ray_jobs" / script).is_file()
    check_stage_args(stage, words[2:])  # the flags parse with the stage's own parser
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == IMAGE_CHECKOUT, f"{name}: working_dir"


def _comparable(config: dict) -> dict:
    """A Serve config without what each deployment sets for itself: model, sets URI, resources, replicas,
    the GPU fast path (channels-last, compile: on in the GPU RayService, off on CPU), the key file (the
    RayService's mounted Secret; `emoji-ldm serve --keys`), and where jobs keep state, what a drawer asks and how
    many draw at once."""
    config = yaml.safe_load(yaml.safe_dump(config))
    for app in config["applications"]:
        for key in ("model", "sets_uri", "channels_last", "compile", "keys", "jobs_uri", "job_num_gpus", "job_slots"):
            app["args"].pop(key, None)
        for d in app["deployments"]:
            d.pop("ray_actor_options")
            d.pop("autoscaling_config")
    return config


def check_serve_config(text: str, name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)  # Ray's own schema, as `serve deploy` checks it
    project = yaml.safe_load((REPO / "emoji_ldm" / "serve" / "serve_config.yaml").read_text())
    assert _comparable(config) == _comparable(project), f"{name}: serveConfigV2 differs from serve_config.yaml"
    for d in config["applications"][0]["deployments"]:
        scaling = d["autoscaling_config"]
        assert scaling["min_replicas"] < scaling["max_replicas"], f"{name}: {d['name']} does not autoscale"


# --- tests ---------------------------------------------------------------------


def test_every_manifest_parses():
    files = manifest_files()
    assert len(files) >= 20
    for path in files:
        docs = load(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert {"apiVersion", "kind"} <= set(doc), f"{path}: a document without apiVersion/kind"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without a name"


def test_base_validates():
    for path in sorted((K8S / "base").glob("*.yaml")):
        for doc in load(path):
            if doc["kind"] in CORE_KINDS:
                validate_core(doc, path.name)
            elif doc["kind"] in RAY_KINDS:
                check_ray_resource(doc, path.name)
            else:
                assert doc["kind"] == "Kustomization", f"{path.name}: unexpected kind {doc['kind']}"


def test_one_rayjob_file_per_stage():
    for stage in PIPELINE_STAGES:
        (doc,) = load(K8S / "base" / f"rayjob.{stage}.yaml")
        assert doc["kind"] == "RayJob" and doc["metadata"]["name"] == f"emoji-{stage}"
        assert doc["metadata"]["labels"]["emoji-ldm/stage"] == stage
    listed = load(K8S / "base" / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(p.name for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = render(overlay)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayJob") == len(PIPELINE_STAGES) and kinds.count("RayService") == 1
    assert {"RayCluster", "StatefulSet", "PersistentVolumeClaim", "NetworkPolicy", "Service", "Job"} <= set(kinds)
    for doc in docs:
        assert doc["metadata"].get("namespace", "emoji-ldm") == "emoji-ldm" or doc["kind"] == "Namespace"
        # the runbook applies one part at a time with -l emoji-ldm/component=...
        assert doc["metadata"]["labels"]["emoji-ldm/component"] in ("store", "cluster", "job", "service")
        if doc["kind"] in CORE_KINDS:
            validate_core(doc, f"overlay {overlay}")
        else:
            check_ray_resource(doc, f"overlay {overlay}")


def test_local_overlay_is_cpu_only_and_gpu_overlay_has_gpus():
    local, gpu = render("local"), render("gpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(local) and "--gpu" not in yaml.safe_dump_all(local)
    assert "num_gpus" not in by_kind(local, "RayService")["emoji"]["spec"]["serveConfigV2"]
    service = by_kind(gpu, "RayService")["emoji"]
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any(g["maxReplicas"] > g["minReplicas"] and "nvidia.com/gpu" in
               g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups)
    cluster = by_kind(gpu, "RayCluster")["emoji"]["spec"]
    assert {g["groupName"] for g in cluster["workerGroupSpecs"]} == {"cpu", "gpu"}
    assert cluster["enableInTreeAutoscaling"] is True
    for job in by_kind(gpu, "RayJob").values():
        stage = job["metadata"]["labels"]["emoji-ldm/stage"]
        uses_gpu = any("nvidia.com/gpu" in c["resources"]["limits"] for t in pod_templates(job).values()
                       for c in containers(t))
        assert uses_gpu == (stage in ("caption", "encode", "train", "bulk")), stage


def test_ray_version_agrees_across_pyproject_dockerfile_and_manifests():
    import ray

    version = pinned_ray_version()
    assert dockerfile_ray_version() == version == ray.__version__
    images = set()
    for doc in every_doc():
        if doc["kind"] in RAY_KINDS and "spec" in doc:
            spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            if "rayVersion" in spec:
                assert spec["rayVersion"] == version, doc["metadata"]["name"]
        images |= set(re.findall(r"image: (\S+)", yaml.safe_dump(doc)))
    tagged = {i for i in images if ours(i) and not DIGEST.search(i)}  # the base and the local overlay
    assert tagged == {f"emoji-ldm:{version}-py311-cpu", f"emoji-ldm-gpu:{version}-py311-gpu"}, tagged
    assert "FROM rayproject/ray:${RAY_VERSION}-${VARIANT}" in (REPO / "infra" / "Dockerfile").read_text()


def test_ray_daemons_run_without_jemalloc_thread_caches():
    """Every Ray pod runs our image, whose MALLOC_CONF turns off jemalloc's per-thread caches in Ray's daemons
    (an idle raylet grew with them); the development head sets the same, and the GCS task-event cap."""
    assert f"ENV MALLOC_CONF={DAEMON_MALLOC_CONF}\n" in (REPO / "infra" / "Dockerfile").read_text()
    head = (REPO / "infra" / "local_ray_head.sh").read_text()
    assert f"export MALLOC_CONF=${{MALLOC_CONF:-{DAEMON_MALLOC_CONF}}}\n" in head
    assert f"export {TASK_EVENTS_ENV}=${{{TASK_EVENTS_ENV}:-{TASK_EVENTS_IN_GCS}}}\n" in head
    for doc in every_doc():
        if doc["kind"] in RAY_KINDS and "spec" in doc:
            for place, template in pod_templates(doc).items():
                for c in containers(template):
                    assert ours(c["image"]), \
                        f"{doc['metadata']['name']} {place}: {c['image']} is not the emoji-ldm image"


@pytest.mark.parametrize("stage", list(STAGES))
def test_ray_jobs_scripts_have_help(stage):
    script = REPO / "ray_jobs" / STAGES[stage].script
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_dockerfile_and_infra_scripts_lint():
    """No Docker engine runs on these machines, so the image is linted, not built: hadolint for the
    Dockerfile (errors fail; it warns that apt packages are not version-pinned) and shellcheck for
    the helper scripts."""
    r = subprocess.run([str(VENV_BIN / "hadolint"), "--failure-threshold", "error", str(REPO / "infra" / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    scripts = sorted(str(p) for p in [*(REPO / "infra").glob("*.sh"), *K8S.glob("*.sh")]) + [str(REPO / ".ci" / "run")]
    r = subprocess.run([str(VENV_BIN / "shellcheck"), *scripts], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- safe to apply: secrets, network, privileges, pinned images ---------------------


def test_no_secret_value_is_committed_and_apply_carries_no_secret():
    """No Secret object in k8s/ (so `kubectl apply -k` never replaces one a cluster uses) and no value that was
    ever committed or ships as a default, anywhere in k8s/ or infra/; k8s/secrets.sh makes them, at random, only
    where missing."""
    files = [p for p in [*K8S.rglob("*"), *(REPO / "infra").rglob("*")] if p.is_file()]
    for path in files:
        text = path.read_text(errors="replace").lower()
        for value in KNOWN_SECRETS:
            assert value not in text, f"{path.relative_to(REPO)} holds the known secret value {value!r}"
    for doc in every_doc():
        assert doc["kind"] != "Secret", f"a Secret {doc['metadata']['name']} is in k8s/: kubectl apply would replace it"
        for key in ("AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD", "RAY_AUTH_TOKEN", "auth_token"):
            assert f"{key}: " not in yaml.safe_dump(doc).replace("key: AWS_SECRET_ACCESS_KEY", ""), \
                f"{doc['kind']}/{doc['metadata']['name']} sets {key} itself"
    script = (K8S / "secrets.sh").read_text()
    # MinIO's root password, a zone's MinIO user key, a zone's Ray token, Redis's password
    assert script.count("openssl rand -hex 32") == 4
    assert 'get secret "$name"' in script and "kept as it is" in script  # an existing Secret is never replaced
    cluster_doc = (REPO / "docs" / "cluster.md").read_text()
    assert "k8s/secrets.sh" in cluster_doc and "change-me" not in cluster_doc


def effective(template: dict, container: dict, key: str):
    """A securityContext field as the container runs with it: its own, else the pod's."""
    own = (container.get("securityContext") or {}).get(key)
    return own if own is not None else (template["spec"].get("securityContext") or {}).get(key)


def check_pod_security(template: dict, where: str) -> None:
    assert template["spec"].get("hostNetwork") is not True and template["spec"].get("hostPID") is not True, where
    for c in containers(template):
        name = f"{where} container {c['name']}"
        assert effective(template, c, "runAsNonRoot") is True, f"{name}: not runAsNonRoot"
        assert effective(template, c, "runAsUser") not in (None, 0), f"{name}: no numeric non-root runAsUser"
        sc = c.get("securityContext") or {}
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation is not false"
        assert sc.get("privileged") is not True, name
        assert "ALL" in sc.get("capabilities", {}).get("drop", []) and not sc.get("capabilities", {}).get("add"), \
            f"{name}: capabilities are not all dropped"
        assert effective(template, c, "seccompProfile") == {"type": "RuntimeDefault"}, f"{name}: no seccomp profile"
        if ours(c["image"]):
            assert effective(template, c, "runAsUser") == 1000, f"{name}: the image's user is ray (1000)"


def test_every_pod_runs_without_root_privilege_escalation_or_capabilities():
    """Every pod template in the base files and both rendered overlays (the overlays' patches replace Ray's
    container lists, so they must say it again); the Ray autoscaler's sidecar too."""
    assert "\nUSER 1000:100\n" in (REPO / "infra" / "Dockerfile").read_text()  # numeric: runAsNonRoot can check it
    seen = 0
    base = [d for p in sorted((K8S / "base").glob("*.yaml")) for d in load(p)]
    for doc in base + render("local") + render("gpu"):
        for place, template in every_pod_template(doc).items():
            check_pod_security(template, f"{doc['kind']}/{doc['metadata']['name']} {place}")
            seen += 1
        if doc["kind"] in RAY_KINDS and doc["kind"] != "Kustomization":
            cluster = ray_cluster_spec(doc)
            if cluster.get("enableInTreeAutoscaling"):
                sc = cluster["autoscalerOptions"].get("securityContext", {})
                assert sc.get("runAsNonRoot") is True and sc.get("allowPrivilegeEscalation") is False and \
                    "ALL" in sc.get("capabilities", {}).get("drop", []), f"{doc['metadata']['name']}: autoscaler"
    assert seen > 50


def matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are understood here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def admitted(policies: list[dict], pod_labels: dict, port: int) -> list[dict] | None:
    """The peers the NetworkPolicies let reach `port` of a pod with `pod_labels`; None when no policy selects
    the pod for ingress (then anyone may)."""
    selecting = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and matches(p["spec"]["podSelector"], pod_labels)]
    if not selecting:
        return None
    peers = []
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is None or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
                peers.extend(rule.get("from") or [{"anyone": True}])
    return peers


RAY_PEER = {"podSelector": {"matchLabels": RAY_NODE}}
SUBMITTER_PEER = {"podSelector": {"matchLabels": {"emoji-ldm/role": "ray-submitter"}}}
OPERATOR_PEER = {"namespaceSelector": {},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
BUCKET_JOB_PEER = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "minio-bucket"}}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_fence_ray_ports_and_minio(overlay):
    """The service's Ray ports here (tests/unit/test_cluster_zones.py checks every zone against every other)."""
    docs = render(overlay)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    zone = {"emoji-ldm/zone": "service"}
    # as KubeRay labels a head, with the zone label of its pod template
    ray_pod = {**RAY_NODE, "ray.io/node-type": "head", "ray.io/cluster": "emoji", **zone}
    zone_peer = {"podSelector": {"matchLabels": {**RAY_NODE, **zone}}}
    submitter_peer = {"podSelector": {"matchLabels": {**SUBMITTER_PEER["podSelector"]["matchLabels"], **zone}}}
    for what, port in RAY_PORTS.items():
        peers = admitted(policies, ray_pod, port)
        assert peers, f"{overlay}: no NetworkPolicy fences Ray's {what} port {port}"
        allowed = [zone_peer] + ([submitter_peer, OPERATOR_PEER] if port == 8265 else [])
        assert all(peer in allowed for peer in peers), f"{overlay}: {what} {port} is open to {peers}"
        assert zone_peer in peers, f"{overlay}: Ray's own pods cannot reach {what} {port}"
    assert {"anyone": True} in admitted(policies, ray_pod, 8000)  # the API, behind its keys
    minio = by_kind(docs, "StatefulSet")["minio"]["spec"]["template"]["metadata"]["labels"]
    assert sorted(map(str, admitted(policies, minio, 9000))) == sorted(map(str, [RAY_PEER, BUCKET_JOB_PEER]))
    assert admitted(policies, minio, 9001) == []  # the console: port-forward only
    # the labels the rules name are on the pods: the bucket Job's, and every RayJob's submitter
    assert matches(BUCKET_JOB_PEER["podSelector"], by_kind(docs, "Job")["minio-bucket"]["spec"]["template"]
                   ["metadata"]["labels"])
    for job in by_kind(docs, "RayJob").values():
        labels = pod_templates(job)["submitter"].get("metadata", {}).get("labels", {})
        assert matches(SUBMITTER_PEER["podSelector"], labels), f"{job['metadata']['name']}: submitter not labelled"
    for policy in policies:
        assert policy["metadata"]["labels"]["emoji-ldm/component"] == "store"  # applied before any pod exists


def test_gpu_overlay_pins_every_image_by_digest_and_build_push_sets_them():
    gpu, local = render("gpu"), render("local")
    images = {c["image"] for d in gpu for t in every_pod_template(d).values() for c in containers(t)}
    assert images and all(DIGEST.search(i) for i in images), sorted(i for i in images if not DIGEST.search(i))
    assert {i.split("@")[0] for i in images} == {"registry.example.com/emoji-ldm",
                                                 "registry.example.com/emoji-ldm-gpu", "minio/minio", "minio/mc",
                                                 "redis"}
    # the local overlay keeps the tags `infra/build_push.sh --kind` loads into kind
    local_images = {c["image"] for d in local for t in every_pod_template(d).values() for c in containers(t)}
    assert not any(DIGEST.search(i) for i in local_images)
    script = (REPO / "infra" / "build_push.sh").read_text()
    assert "overlay=k8s/overlays/gpu/kustomization.yaml" in script and "RepoDigests" in script
    entries = load(K8S / "overlays" / "gpu" / "kustomization.yaml")[0]["images"]
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", e["digest"]) for e in entries)


# --- serving capacity: the Generator at its peak beside a job's drawer --------------------------------------------


def _quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity ("4", "500m", 1) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_resources(group: dict) -> dict[str, float]:
    """What one pod of a group gives Ray: rayStartParams num-cpus / num-gpus, else the container's limits."""
    params, limits = group.get("rayStartParams", {}), containers(group["template"])[0]["resources"]["limits"]
    return {"CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
            "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}


def every_rayservice() -> dict[str, dict]:
    """Each RayService as applied: the base file's, and each overlay's rendered."""
    services = {f"base {p.name}": d for p in sorted((K8S / "base").glob("*.yaml")) for d in load(p)
                if d["kind"] == "RayService"}
    for overlay in OVERLAYS:
        services |= {f"overlay {overlay} {name}": d for name, d in by_kind(render(overlay), "RayService").items()}
    return services


def test_every_rayservice_fits_its_generator_at_peak_beside_its_jobs():
    """A job's drawer asks for its own GPUs (job_num_gpus), and at most `job_slots` drawers run at once (the fair
    queue's cap, cluster-wide): when the Generator's replicas at max_replicas x num_gpus and that many drawers do not
    fit the worker groups at maxReplicas, jobs stay queued at peak and the Generator cannot scale up while jobs hold
    GPUs. A service with jobs states its cap (0 would be "what the cluster holds", which an autoscaling cluster
    never settles). The GPUs are placed as Ray does (a share below 1 out of one GPU, `placement.packs`); the CPUs
    of the Generator, the Ingress and the drawers are summed over every pod the cluster can have."""
    from emoji_ldm.serve.placement import packs, replica_range

    services = every_rayservice()
    assert len(services) == 1 + len(OVERLAYS), sorted(services)
    for name, doc in services.items():
        app = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]
        deployments = {d["name"]: d for d in app["deployments"]}
        slots = int(app["args"].get("job_slots", 0)) if app["args"].get("jobs_uri") else 0
        assert slots or not app["args"].get("jobs_uri"), f"{name}: jobs without job_slots: drawers are not capped"
        job = {k: float(app["args"].get(f"job_num_{k.lower()}s", 0)) * slots for k in ("CPU", "GPU")}
        cluster = ray_cluster_spec(doc)
        pods = [_pod_resources(cluster["headGroupSpec"])] + [_pod_resources(g) for g in cluster["workerGroupSpecs"]
                                                             for _ in range(g["maxReplicas"])]
        generator = deployments["Generator"]
        most = replica_range(generator)[1]
        share = float(generator["ray_actor_options"].get("num_gpus", 0))
        drawer = float(app["args"].get("job_num_gpus", 0))
        need, have = most * share + job["GPU"], sum(p["GPU"] for p in pods)
        assert need <= have and packs([share] * most + [drawer] * slots, [p["GPU"] for p in pods]), \
            (f"{name}: at peak the Generator's {most} replicas x {share:g} GPU + {slots} drawers x {drawer:g} GPU = "
             f"{need:g} GPUs, but the worker groups hold {have:g} at maxReplicas")
        cpus = job["CPU"] + sum(replica_range(d)[1] * float(d["ray_actor_options"].get("num_cpus", 1))
                                for d in deployments.values())
        assert cpus <= sum(p["CPU"] for p in pods), f"{name}: {cpus:g} CPUs at peak, more than the pods have"

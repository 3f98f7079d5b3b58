"""One trust zone per workload: the service, the pipeline jobs, the crawl and the interactive cluster each have their
own Ray token, their own S3 user (a MinIO user whose policy names its prefixes), and NetworkPolicies that admit a
zone's Ray ports only from its own pods; the service's and the crawl's pods reach neither the cloud's metadata
service nor the cluster's private ranges. MinIO expires what retention deletes under jobs/ and sets/."""

from __future__ import annotations

import ipaddress
import json
import subprocess

import pytest
import yaml

from tests.k8s import K8S, by_kind, pod_templates, ray_cluster_spec, render
from tests.unit.test_cluster_blockers import fake_kubectl

ZONES = ("service", "jobs", "crawl", "cluster")
ZONE = "emoji-ldm/zone"
BUCKET = "emoji-ldm"
METADATA = ("169.254.169.254", "fd00:ec2::254")
PRIVATE = ("10.1.2.3", "172.20.0.5", "192.168.4.4", "100.64.1.1")  # pod and service ranges of EKS, GKE, kind
PUBLIC = ("93.184.216.34", "2606:4700::1111")  # where webhooks and crawled pages are
RAY_PORTS = (6379, 8265, 10001, 52365, 8076)  # GCS, dashboard, client, dashboard agent, an object manager
# what each workload may write (W) and read (R) in the bucket; nothing else
ACCESS = {"service": {"W": {"sets/", "jobs/"}, "R": {"runs/", "weights/"}},
          "jobs": {"W": {"datasets/", "latents/", "runs/", "bulk/"}, "R": {"prompts/", "weights/"}},
          "crawl": {"W": {"datasets/"}, "R": set()},
          "cluster": {"W": {"datasets/", "latents/", "runs/", "bulk/", "prompts/", "weights/"}, "R": set()}}


def zone_of(doc: dict) -> str:
    if doc["kind"] == "RayJob":
        return "crawl" if doc["metadata"]["labels"]["emoji-ldm/stage"] == "crawl" else "jobs"
    return {"RayService": "service", "RayCluster": "cluster"}[doc["kind"]]


def ray_docs(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("RayCluster", "RayJob", "RayService")]


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_each_cluster_class_has_its_own_token_s3_user_and_zone_label(overlay):
    for doc in ray_docs(render(overlay)):
        zone, name = zone_of(doc), f"{overlay} {doc['kind']}/{doc['metadata']['name']}"
        assert ray_cluster_spec(doc)["authOptions"] == {"mode": "token", "secretName": f"emoji-ldm-ray-token-{zone}"}, \
            f"{name}: not the {zone} zone's Ray token"
        for place, template in pod_templates(doc).items():
            assert template.get("metadata", {}).get("labels", {}).get(ZONE) == zone, f"{name} {place}: no zone label"
            for c in template["spec"]["containers"]:
                refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
                assert refs == ([] if place == "submitter" else [f"emoji-ldm-s3-{zone}"]), f"{name} {place}: {refs}"
            if zone != "service":
                assert "api-keys" not in str(template["spec"].get("volumes", [])), f"{name} {place}: holds API keys"


def test_secrets_sh_makes_a_token_and_an_s3_user_per_zone(tmp_path):
    env, log = fake_kubectl(tmp_path)
    r = subprocess.run([str(K8S / "secrets.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    creates = [line.split() for line in log.read_text().splitlines() if "create secret generic" in line]
    names = {words[words.index("generic") + 1] for words in creates}
    assert names == {f"emoji-ldm-{kind}-{z}" for z in ZONES for kind in ("ray-token", "s3")} | {"emoji-ldm-minio-root",
                                                                                             "emoji-ldm-redis"}
    users = {w.split("=", 1)[1] for words in creates for w in words if w.startswith("--from-literal=AWS_ACCESS_KEY_ID")}
    assert len(users) == len(ZONES), users  # a MinIO user per zone, none of them the root user


def labels_match(selector: dict | None, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())


def peer_admits(peer: dict, pod: dict) -> bool:
    """Whether one `from`/`to` entry matches a pod, given as {labels, namespace} (our namespace is emoji-ldm)."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        in_ns = labels_match(peer["namespaceSelector"], pod.get("ns_labels", {}))
    else:
        in_ns = pod.get("namespace", "emoji-ldm") == "emoji-ldm"
    return in_ns and labels_match(peer.get("podSelector"), pod["labels"])


def selecting(policies: list[dict], labels: dict, kind: str) -> list[dict]:
    return [p for p in policies if kind in p["spec"].get("policyTypes", ["Ingress"])
            and labels_match(p["spec"]["podSelector"], labels)]


def ingress_allowed(policies: list[dict], target: dict, source: dict, port: int) -> bool:
    chosen = selecting(policies, target, "Ingress")
    if not chosen:
        return True
    for p in chosen:
        for rule in p["spec"].get("ingress", []):
            if rule.get("ports") is None or any(x.get("port") == port for x in rule["ports"]):
                if not rule.get("from") or any(peer_admits(peer, source) for peer in rule["from"]):
                    return True
    return False


def ray_pod(zone: str, node_type: str = "head") -> dict:
    return {"ray.io/is-ray-node": "yes", "ray.io/node-type": node_type, ZONE: zone}


def sources() -> dict[str, dict]:
    found = {f"{z} ray pod": {"labels": ray_pod(z, "worker")} for z in ZONES}
    found |= {f"{z} submitter": {"labels": {"emoji-ldm/role": "ray-submitter", ZONE: z}} for z in ZONES}
    found["operator"] = {"labels": {"app.kubernetes.io/name": "kuberay-operator"}, "namespace": "kuberay"}
    found["another pod"] = {"labels": {"app": "x"}}
    return found


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_a_zones_ray_ports_admit_only_its_own_pods(overlay):
    policies = [d for d in render(overlay) if d["kind"] == "NetworkPolicy"]
    for zone in ZONES:
        for port in RAY_PORTS:
            allowed = {name for name, src in sources().items()
                       if ingress_allowed(policies, ray_pod(zone), src, port)}
            expected = {f"{zone} ray pod"}
            if port == 8265:
                expected |= {f"{zone} submitter", "operator"}
            if port == 52365:
                expected |= {"operator"}
            assert allowed == expected, f"{overlay}: {zone}'s port {port} admits {sorted(allowed)}"
    assert ingress_allowed(policies, ray_pod("service", "worker"), sources()["another pod"], 8000)
    assert not ingress_allowed(policies, ray_pod("jobs", "worker"), sources()["another pod"], 8000)


def egress_allows_ip(policies: list[dict], labels: dict, ip: str) -> bool:
    chosen = selecting(policies, labels, "Egress")
    if not chosen:
        return True
    address = ipaddress.ip_address(ip)
    for p in chosen:
        for rule in p["spec"].get("egress", []):
            for peer in rule.get("to") or [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]:
                block = peer.get("ipBlock")
                if block is None:
                    continue
                net = ipaddress.ip_network(block["cidr"])
                if address.version == net.version and address in net and not any(
                        address in ipaddress.ip_network(e) for e in block.get("except", [])
                        if ipaddress.ip_network(e).version == address.version):
                    return True
    return False


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_service_and_crawl_pods_reach_neither_metadata_nor_cluster_ranges(overlay):
    """The service sends webhooks and the crawl loads third-party pages: both may reach public addresses only, plus
    their own zone's pods, MinIO's API and DNS."""
    docs = render(overlay)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for zone, node_type in (("service", "worker"), ("crawl", "head"), ("crawl", "worker")):
        labels = ray_pod(zone, node_type)
        assert selecting(policies, labels, "Egress"), f"{overlay}: no egress policy for {zone} {node_type}"
        for ip in METADATA + PRIVATE:
            assert not egress_allows_ip(policies, labels, ip), f"{overlay}: {zone} {node_type} may reach {ip}"
        for ip in PUBLIC:
            assert egress_allows_ip(policies, labels, ip), f"{overlay}: {zone} {node_type} may not reach {ip}"
        peers = [peer for p in selecting(policies, labels, "Egress") for r in p["spec"]["egress"]
                 for peer in r.get("to", [])]
        minio = {"labels": {"app.kubernetes.io/name": "minio"}}
        dns = {"labels": {"k8s-app": "kube-dns"}, "namespace": "kube-system",
               "ns_labels": {"kubernetes.io/metadata.name": "kube-system"}}
        for what, pod in (("MinIO", minio), ("DNS", dns), ("its own zone", {"labels": ray_pod(zone, "head")})):
            assert any(peer_admits(peer, pod) for peer in peers), f"{overlay}: {zone} cannot reach {what}"
        assert not any(peer_admits(peer, {"labels": ray_pod("jobs")}) for peer in peers), f"{zone} reaches jobs"


def minio_config() -> dict:
    return by_kind(render("local"), "ConfigMap")["emoji-ldm-minio-config"]["data"]


def prefixes(policy: dict, actions: set[str]) -> set[str]:
    """The object prefixes a policy grants every one of `actions` on."""
    found = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        if actions <= set(statement["Action"]):
            for arn in statement["Resource"]:
                assert arn.startswith(f"arn:aws:s3:::{BUCKET}/") or arn == f"arn:aws:s3:::{BUCKET}", arn
                if arn.endswith("*") and "/" in arn:
                    found.add(arn.split(f"{BUCKET}/", 1)[1].rstrip("*"))
    return found


def test_each_minio_user_is_scoped_to_its_workloads_prefixes():
    data = minio_config()
    for zone, access in ACCESS.items():
        policy = json.loads(data[f"policy-{zone}.json"])
        assert not any("*" in a and a != "s3:*" and a.endswith("*") for s in policy["Statement"] for a in s["Action"])
        assert "s3:*" not in str(policy), f"{zone}: s3:* grants everything"
        assert prefixes(policy, {"s3:PutObject", "s3:DeleteObject"}) == access["W"], zone
        assert prefixes(policy, {"s3:GetObject"}) == access["W"] | access["R"], zone
    script = by_kind(render("local"), "Job")["minio-bucket"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for zone in ZONES:
        assert f"policy-{zone}.json" in script or "policy-$zone.json" in script
    assert "mc admin user add" in script and "mc admin policy attach" in script and "mc ilm import" in script


def test_minio_expires_noncurrent_versions_and_delete_markers_under_jobs_and_sets():
    rules = json.loads(minio_config()["lifecycle.json"])["Rules"]
    by_prefix = {r["Filter"]["Prefix"]: r for r in rules}
    assert set(by_prefix) == {"jobs/", "sets/"}, "lifecycle rules touch only what retention deletes"
    for prefix, rule in by_prefix.items():
        assert rule["Status"] == "Enabled"
        assert rule["NoncurrentVersionExpiration"]["NoncurrentDays"] >= 1, prefix
        assert rule["Expiration"] == {"ExpiredObjectDeleteMarker": True}, prefix


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_only_minio_and_the_bucket_job_hold_minios_root_user(overlay):
    text_of = {f"{d['kind']}/{d['metadata']['name']}": yaml.safe_dump(d) for d in render(overlay)}
    holders = {name for name, text in text_of.items() if "emoji-ldm-minio-root" in text}
    assert holders == {"StatefulSet/minio", "Job/minio-bucket"}, holders


def test_bucket_job_script_makes_each_user_with_its_policy_and_the_lifecycle(tmp_path):
    """The bucket Job's script, run by /bin/sh with a stand-in `mc` that logs its calls, the Job's env and the
    ConfigMaps' files where the Job mounts them (paths moved under tmp_path)."""
    job = by_kind(render("local"), "Job")["minio-bucket"]["spec"]["template"]["spec"]["containers"][0]
    config, prompts, bin_dir, log = tmp_path / "config", tmp_path / "prompts", tmp_path / "bin", tmp_path / "calls"
    for folder, files in ((config, minio_config()), (prompts, {"emoji-set.txt": "red heart\n"})):
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    bin_dir.mkdir()
    (bin_dir / "mc").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\n')
    (bin_dir / "mc").chmod(0o755)
    script = job["args"][0].replace("/config/", f"{config}/").replace("/prompts/", f"{prompts}/")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MINIO_ENDPOINT": "http://minio:9000", "MINIO_ROOT_USER": "root",
           "MINIO_ROOT_PASSWORD": "rootpw"}
    env |= {f"USER_{z}": f"emoji-ldm-{z}" for z in ZONES} | {f"SECRET_{z}": f"key-{z}" for z in ZONES}
    assert {e["name"] for e in job["env"]} >= {k for k in env if k.startswith(("USER_", "SECRET_"))}
    r = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "alias set store http://minio:9000 root rootpw"
    assert "ilm import store/emoji-ldm" in calls and "version enable store/emoji-ldm" in calls
    for zone in ZONES:
        assert f"admin user add store emoji-ldm-{zone} key-{zone}" in calls
        assert f"admin policy create store emoji-ldm-{zone} {config}/policy-{zone}.json" in calls
        assert f"admin policy attach store emoji-ldm-{zone} --user emoji-ldm-{zone}" in calls

"""Every RayJob of the local overlay, run here through the Ray Jobs API, then its RayService.

The session's Ray head (`ray start --head` on 127.0.0.1, as `infra/local_ray_head.sh` starts it) and
S3 server (`infra/local_s3.sh`: moto_server, with the bucket made as the minio-bucket Job makes it),
both started by tests/conftest.py, stand in for the cluster and MinIO. Each test takes a
RayJob from `kubectl kustomize k8s/overlays/local` and submits its entrypoint string with its runtime
env, as KubeRay's submitter does. What differs
here, and only this:
- working_dir: the image's checkout (/home/ray/emoji-ldm) is this repository;
- the crawl job's `--profile discords` is a profile of the local imitation of discords.com
  (tests/crawl_site.py): no test talks to the internet;
- the RayService's http_options listen on a free port of 127.0.0.1 (KubeRay owns the ports there).
The stages share the bucket, so the tests run in file order: build, crawl, caption, encode,
train, bulk, serve. Then `emoji-ldm submit` and `emoji-ldm jobs` against the same head.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import socket
import subprocess
import time
import zipfile
from dataclasses import dataclass

import pytest
import yaml
from deltalake import DeltaTable

from tests.conftest import REPO, VENV_BIN, free_port, run_cli
from tests.crawl_site import CrawlSite
from tests.k8s import IMAGE_CHECKOUT, by_kind, render
from tests.serving import get, post, wait_for

pytestmark = [pytest.mark.s3, pytest.mark.slow]
BUCKET = "s3://emoji-ldm"


@dataclass
class LocalCluster:
    address: str  # the dashboard, http://127.0.0.1:PORT
    env: dict[str, str]  # the helpers' variables plus the S3 ones

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def table(self, uri: str, version: int | None = None) -> DeltaTable:
        from emoji_ldm.store.uri import storage_options

        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return DeltaTable(uri, version=version, storage_options=storage_options())
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The session's cluster: its Jobs API, and the variables of `infra/local_s3.sh` its workers have."""
    yield LocalCluster(ray_cluster.dashboard, {**ray_cluster.s3.env(), "RAY_AUTH_MODE": "disabled"})


@pytest.fixture(scope="module")
def local_overlay():
    return render("local")


def run_rayjob(cluster: LocalCluster, overlay: list[dict], stage: str, replace: dict[str, str] | None = None,
               timeout: float = 600) -> str:
    """Submit the RayJob emoji-STAGE the way KubeRay's submitter does; return its logs once it succeeded."""
    spec = by_kind(overlay, "RayJob")[f"emoji-{stage}"]["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == IMAGE_CHECKOUT
    runtime_env["working_dir"] = str(REPO)
    entrypoint = spec["entrypoint"]
    for old, new in (replace or {}).items():
        assert old in entrypoint, f"{old!r} is not in the {stage} entrypoint {entrypoint!r}"
        entrypoint = entrypoint.replace(old, new)
    client = cluster.client()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=spec["metadata"])
    deadline = time.time() + timeout
    while (status := str(client.get_job_status(job_id).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.time() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"RayJob {stage} still {status} after {timeout} s:\n{client.get_job_logs(job_id)[-4000:]}")
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", f"RayJob {stage}: {status}\n{logs[-6000:]}"
    return logs


def test_rayjob_build(cluster, local_overlay):
    # the manifest's job on 96 of its 256 Twemoji (enough for two micro batches of 32): the same path
    logs = run_rayjob(cluster, local_overlay, "build", replace={"--limit 256": "--limit 96"})
    assert "build: 96 in" in logs
    table = cluster.table(f"{BUCKET}/datasets/emoji")
    assert table.version() == 0 and 80 <= table.to_pyarrow_table(columns=["id"]).num_rows <= 96  # less duplicates


def test_rayjob_crawl(cluster, local_overlay, tmp_path):
    site = CrawlSite(pages=3, per_page=4, slow_page=0, flaky_page=0)
    try:
        profile = tmp_path / "discords-imitation.yaml"
        profile.write_text(site.profile_yaml())
        logs = run_rayjob(cluster, local_overlay, "crawl", replace={"--profile discords": f"--profile {profile}"})
    finally:
        site.stop()
    # the site shows the first Twemoji, which the build job already added: found, fetched, not added twice
    m = re.search(r"build: (\d+) in, .*?(\d+) already in table\), (\d+) added", logs)
    assert m, logs[-3000:]
    images_in, already, added = map(int, m.groups())
    assert images_in >= 2 * site.per_page and already > 0
    assert site.hits["/emoji-list/tag/Blobs?page=1"] and not site.hits.get("/emoji-list/tag/Blobs?page=3")  # 1-2
    rows = cluster.table(f"{BUCKET}/datasets/emoji").to_pyarrow_table(columns=["id"]).num_rows
    built = cluster.table(f"{BUCKET}/datasets/emoji", version=0).to_pyarrow_table(columns=["id"]).num_rows
    assert rows == built + added
    shards = cluster.s3().list_objects_v2(Bucket="emoji-ldm", Prefix="datasets/emoji/_emoji_ldm/crawl/testsite/Blobs/")
    assert shards["KeyCount"] >= 1  # what a re-run skips


def test_rayjob_caption(cluster, local_overlay):
    run_rayjob(cluster, local_overlay, "caption")
    rows = cluster.table(f"{BUCKET}/datasets/emoji").to_pyarrow_table(columns=["caption", "caption_model"]).to_pylist()
    assert rows and all(r["caption"] and r["caption_model"] == "metadata" for r in rows)


def test_rayjob_encode(cluster, local_overlay):
    # 2 of its 50 VAE steps, on one Ray Train worker (the manifest's two: test_train_loop, test_two_node)
    run_rayjob(cluster, local_overlay, "encode", replace={"--vae-steps 50": "--vae-steps 2 --vae-workers 1"})
    dataset_rows = cluster.table(f"{BUCKET}/datasets/emoji").to_pyarrow_table(columns=["id"]).num_rows
    assert cluster.table(f"{BUCKET}/latents/emoji").to_pyarrow_table(columns=["id"]).num_rows == dataset_rows


def test_rayjob_train(cluster, local_overlay):
    # the manifest's job with 2 of its 100 steps, a smaller UNet and batch: the same path (ZeRO-2 on 2 workers, S3
    # checkpoints, export)
    small = "--max-steps 2 --set train.batch_size=8 --set unet.block_out_channels=32,64"
    logs = run_rayjob(cluster, local_overlay, "train", replace={"--max-steps 100": small}, timeout=900)
    assert "train: 2 steps" in logs
    keys = {o["Key"] for o in cluster.s3().list_objects_v2(Bucket="emoji-ldm", Prefix="runs/emoji/")["Contents"]}
    assert "runs/emoji/model/model_index.json" in keys and "runs/emoji/model/model_card.json" in keys
    assert any(k.startswith("runs/emoji/checkpoints/") for k in keys)


def test_rayjob_bulk(cluster, local_overlay):
    run_rayjob(cluster, local_overlay, "bulk", replace={"--steps 20": "--steps 4"})  # 4 of its 20 sampler steps
    prompts = cluster.s3().get_object(Bucket="emoji-ldm", Key="prompts/emoji-set.txt")["Body"].read().decode()
    n_prompts = len([p for p in prompts.splitlines() if p.strip()])
    manifest = cluster.table(f"{BUCKET}/bulk/emoji-set/manifest").to_pyarrow_table().to_pylist()
    assert len(manifest) == 2 * n_prompts  # --per-prompt 2
    pngs = cluster.s3().list_objects_v2(Bucket="emoji-ldm", Prefix="bulk/emoji-set/images/")["KeyCount"]
    assert pngs == 2 * n_prompts


def test_rayservice_serves_an_emoji_set(cluster, local_overlay, ray_local, tmp_path):
    from ray import serve as ray_serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from emoji_ldm.serve.keys import KeysCreateConfig, create_command

    service = by_kind(local_overlay, "RayService")["emoji"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    # the key file where the pods mount the emoji-ldm-api-keys Secret: here a file of one key
    args = config["applications"][0]["args"]
    assert args["keys"] == "/etc/emoji-ldm/keys/keys.json"
    args["keys"] = str(tmp_path / "keys.json")
    made = create_command(KeysCreateConfig(file=args["keys"], name="ci"))
    auth = {"authorization": "Bearer " + next(w for w in made.split() if w.startswith("eml_"))}
    serve = ServeSubmissionClient(cluster.address)
    serve.deploy_applications(config)
    try:
        def running():
            apps = serve.get_serve_details().get("applications", {})
            status = apps.get("emoji", {}).get("status")
            assert status not in ("DEPLOY_FAILED", "UNHEALTHY"), apps["emoji"].get("message")
            return status == "RUNNING"

        wait_for(running, 300, "the RayService's application to run")
        url = f"http://127.0.0.1:{port}"
        body = {"theme": "blob", "items": ["happy", "sad", "party"], "steps": 4}
        assert post(url + "/v1/emoji-sets", body).status == 401
        resp = post(url + "/v1/emoji-sets", body, headers=auth)
        assert resp.status == 200 and resp.headers["content-type"] == "application/zip", resp.data[:300]
        names = zipfile.ZipFile(io.BytesIO(resp.data)).namelist()
        assert sum(n.endswith(".png") and not n.endswith("sheet.png") for n in names) == 3
        stored = post(url + "/v1/emoji-sets", {"theme": "cat", "items": ["smiling"], "steps": 3, "store": True},
                      headers=auth)
        assert stored.status == 200 and stored.json()["uri"].startswith(f"{BUCKET}/sets/set-")
    finally:
        serve.delete_applications()
        ray_serve.shutdown()  # Serve itself too: the next app on this cluster listens on another port


# --- emoji-ldm submit / jobs --------------------------------------------------


def cli(cluster: LocalCluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"RAY_AUTH_MODE": "disabled"}, timeout=timeout)


def test_submit_success_follows_logs(cluster):
    out = f"{BUCKET}/datasets/submitted"
    r = cli(cluster, "submit", "build", "--source", "twemoji", "--out", out, "--limit", "8",
            "--address", cluster.address, "--submission-id", "submit-ok")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted submit-ok" in r.stdout and "python ray_jobs/build_dataset.py" in r.stdout
    assert "build: 8 in" in r.stdout and "job submit-ok succeeded" in r.stdout  # the job's own log, followed
    assert cluster.table(out).to_pyarrow_table(columns=["id"]).num_rows == 8

    installed = cli(cluster, "submit", "build", "--installed", "--source", "twemoji",
                    "--out", f"{BUCKET}/datasets/inst", "--limit", "4", "--address", cluster.address)
    assert installed.returncode == 0 and "emoji-ldm dataset build" in installed.stdout, installed.stdout[-2000:]

    listed = cli(cluster, "jobs", "list", "--address", cluster.address)
    line = next(x for x in listed.stdout.splitlines() if x.startswith("submit-ok"))
    assert "SUCCEEDED" in line and " build " in line
    logs = cli(cluster, "jobs", "logs", "submit-ok", "--address", cluster.address)
    assert logs.returncode == 0 and "build: 8 in" in logs.stdout


def test_submit_failure_shows_logs_and_exit_status(cluster):
    r = cli(cluster, "submit", "build", "--source", "nosuchsource", "--out", f"{BUCKET}/datasets/never",
            "--address", cluster.address, "--submission-id", "submit-bad")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "emoji-ldm: error:" in r.stdout and "nosuchsource" in r.stdout  # the job's log, shown
    assert "job submit-bad failed, exit code 2" in r.stdout
    assert cluster.s3().list_objects_v2(Bucket="emoji-ldm", Prefix="datasets/never/")["KeyCount"] == 0


def test_stop_a_running_job(cluster):
    r = cli(cluster, "submit", "build", "--source", "twemoji", "--out", f"{BUCKET}/datasets/stopped", "--no-wait",
            "--address", cluster.address, "--submission-id", "submit-stop")
    assert r.returncode == 0 and "emoji-ldm jobs logs submit-stop --follow" in r.stdout
    stopped = cli(cluster, "jobs", "stop", "submit-stop", "--address", cluster.address)
    assert stopped.returncode == 0 and "job submit-stop: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr


def test_submit_and_jobs_bad_input(cluster, tmp_path, cli_in_process):
    """In this process (the Jobs API is HTTP: no Ray driver), each refused with exit 2 and its one line."""
    held = socket.socket()  # bound, never listening: nothing else can take the port while the test runs
    held.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{held.getsockname()[1]}"
    cases = [
        (["submit", "build", "--source", "twemoji", "--out", "x", "--address", closed], "cannot reach a Ray dashboard"),
        (["submit", "build", "--source", "twemoji", "--out", "x", "--address", "127.0.0.1:8265"],
         "is not a Ray dashboard URL"),
        (["submit", "train", "--data", "x", "--out", "y", "--max-stepz", "3", "--address", cluster.address],
         "do not parse"),
        (["submit", "build", "--source", "twemoji", "--out", "x", "--working-dir", str(tmp_path),
          "--address", cluster.address], "has no ray_jobs/build_dataset.py"),
        (["submit", "build", "--source", "twemoji", "--out", "x", "--env", "NOEQUALS", "--address", cluster.address],
         "is not NAME=VALUE"),
        (["jobs", "logs", "no-such-job", "--address", cluster.address], "no job 'no-such-job'"),
        (["jobs", "stop", "no-such-job", "--address", cluster.address], "no job 'no-such-job'"),
    ]
    for args, message in cases:
        code, err = cli_in_process(*args)
        assert code == 2 and message in err, f"{shlex.join(args)}: {code}\n{err}"
    code, err = cli_in_process("submit", "nosuchstage")
    assert code == 2 and "unknown stage 'nosuchstage'; choose one of build, caption, crawl" in err


def test_jobs_with_ray_token_authentication(tmp_path):
    """A head with Ray's token authentication on, as KubeRay's `authOptions` starts it: RAY_AUTH_TOKEN alone (what
    the emoji-ldm-ray-token-ZONE Secret holds) gets `jobs` in; no token and a wrong one get one clear line each."""
    import secrets
    import shutil
    import signal
    import tempfile

    token = secrets.token_hex(16)
    dashboard = free_port()
    temp = tempfile.mkdtemp(prefix="rauth-", dir="/tmp")  # short: Ray's socket paths live under it
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", f"--dashboard-port={dashboard}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=0", f"--temp-dir={temp}",
         "--disable-usage-stats"], env={**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ADDRESS": "",
                                        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},  # stopped at once at the end
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"

    def jobs(env: dict) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "emoji-ldm"), "jobs", "list", "--address", url], capture_output=True,
                              text=True, timeout=120, env={**clean, "RAY_ADDRESS": "", **env})

    try:
        def up():
            assert head.poll() is None, "the token-auth head exited"
            try:
                return get(url + "/api/version").status in (200, 401, 403)
            except Exception:
                return False

        wait_for(up, 120, "the token-auth head's dashboard", every=1)
        none = jobs({})
        assert none.returncode == 2 and "uses token authentication: set RAY_AUTH_TOKEN" in none.stderr, none.stderr
        wrong = jobs({"RAY_AUTH_TOKEN": "0" * 32})
        assert wrong.returncode == 2 and "refused the token in RAY_AUTH_TOKEN" in wrong.stderr, wrong.stderr
        right = jobs({"RAY_AUTH_TOKEN": token})
        assert right.returncode == 0 and "no jobs" in right.stdout, right.stderr
        assert token not in right.stdout + right.stderr + wrong.stderr + none.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)

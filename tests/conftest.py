"""Shared fixtures: one Ray cluster and one S3 server for the whole session, the tiny pipeline run once,
a local HTTP site.

The S3 server is what `infra/local_s3.sh` starts (a moto_server process, the emoji-ldm bucket made as
the minio-bucket Job makes it); the cluster is a head as `infra/local_ray_head.sh` starts it (`ray
start --head`, its dashboard and Jobs API, here 2 CPUs and no log monitor), with that server's variables.
Both start the first time a test needs them and stop at the end of the session. In-process tests join the
cluster as a driver (`ray_local`), CLI subprocesses through RAY_ADDRESS (`run_cli`), the RayJob tests
through its Jobs API. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# The virtualenv's programs first, for this process and all it starts (Ray nodes, CLI runs), as `source
# .venv/bin/activate` would: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH, and the
# venv's (1.13) and Debian's (1.11) hash the build log differently, so a suite that mixed them rebuilt the op
# (about a minute each time) whenever the other one ran.
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"

os.environ.setdefault("RAY_ACCEPT_LOCAL_EXECUTION_WARNINGS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller polls its workers every 2 s by default, so every run (and every restart after a failure)
# ended 3-4 s after its workers had; at 0.25 s it ends within half a second. About 20 runs in the suite. Ray Train
# passes the variable from the driver (this process, the CLI runs, the Ray head's job drivers) to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train starts a PreemptionWatcher actor (a Python process of its own, polling the nodes' drain state every 5 s)
# for every run and keeps it across restarts: about 2 CPU seconds a run, for a preemption that a local cluster never
# has (no test drains a node; the project does nothing of its own on preemption). Propagated as the one above.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# A raylet keeps as many idle workers as its node has CPUs (2 here) and kills the rest a second after they go idle.
# The suite's stages run one after another in the same few jobs, each with more tasks and actors than that, so
# every stage started its workers again: test_dataset_local.py and test_bulk.py started 72 workers, now 22
# (150 s -> 98 s, 222 -> 128 CPU s on 2 cores, twice each). Every Ray the tests start (the head, the second node,
# a CLI run's own) reads it from this environment.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
# torch's OpenMP threads (libgomp) spin for a while after each parallel op before they sleep. Each process here
# has as many threads as the machine has cores, and two xdist workers, Ray's actors and CLI runs share the two
# cores: the spinning took CPU that another process needed. Passive waiting: the in-process torch tests use 0.79x
# the CPU seconds (bench/omp_wait.py). Every process the tests start inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray's usage stats: the heads are started without them (`--disable-usage-stats`), but each driver (this process,
# a CLI run) that ran Ray Data made a detached usage-collection actor and sent it every execution.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(items):
    """Every integration test is slow (Ray, servers, a browser); `make test-fast` runs the rest."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)


# Integration tests that start no Ray (gpu_check/run.py runs in one process without it; the artifact cache's
# processes read S3, and each xdist worker has an S3 server of its own): they may run beside the rest, as the
# unit tests do.
NO_SHARED_SERVICES = ("tests/integration/test_gpu_check.py", "tests/integration/test_artifact_cache.py")


# The modules that start from the session's tiny pipeline (the `pipeline` fixture): one unit of work, so that one
# worker makes it once. A module missing here still passes; it costs a second pipeline in the other worker.
# DreamBooth (its own models), the training error boundary and captioning (their own runs) go with them, so that
# the two units take about as long.
PIPELINE_MODULES = tuple(f"tests/integration/test_{m}.py" for m in ("harness", "lineage", "train_loop", "training",
                                                                    "two_node", "dreambooth", "error_boundary",
                                                                    "caption"))


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers (`-n 2`), and the integration tests are two units of work of
    about equal length, one per worker: the modules that share the session's tiny pipeline (and DreamBooth), and
    the rest. Each unit runs in order, with its worker's own Ray head and S3 server (`_Session`): a cluster runs
    one Serve, and each module leaves its cluster idle for the next. The unit tests (they start no Ray and no server:
    tests/unit/conftest.py refuses it) fill in wherever a worker is free. xdist's own `--dist loadgroup` cannot
    group tests under pytest 9.2: it renames items through `Item._nodeid`, which pytest no longer reads."""
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationInTwoUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(PIPELINE_MODULES):
                return "integration: the pipeline's modules, DreamBooth, the error boundary and captioning"
            if nodeid.startswith("tests/integration/") and not nodeid.startswith(NO_SHARED_SERVICES):
                return "integration: the rest"
            return nodeid

    return IntegrationInTwoUnits(config, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_gloo(monkeypatch):
    """A one-process gloo group, as a Ray Train worker on CPU has, for DeepSpeed outside Ray; without DeepSpeed's
    shared-memory all-reduce, as a worker (`runner.no_shared_memory_all_reduce`)."""
    import torch

    from emoji_ldm.train.runner import no_shared_memory_all_reduce

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)
    no_shared_memory_all_reduce()  # imports DeepSpeed: after DS_ACCELERATOR
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None  # DeepSpeed's clone of the world group went with it: the next test's engine makes one


# --- S3 ----------------------------------------------------------------------

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen | None = None  # None: the session's server, stopped with the session
    credentials: dict[str, str] = field(default_factory=lambda: dict(S3_ENV))

    def env(self) -> dict[str, str]:
        return {**self.credentials, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def start_moto(extra_env: dict | None = None) -> S3Server:
    """A moto_server of its own (e.g. one that enforces auth) on a free loopback port, once it listens."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(extra_env or {})},
    )
    deadline = time.time() + 30
    while True:  # a TCP connect, not a request: with auth enforced every request counts
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    return S3Server(f"http://127.0.0.1:{port}", proc)


def stop_moto(server: S3Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()


# --- the session's S3 server and Ray cluster ---------------------------------------


@dataclass
class Cluster:
    """The session's Ray head: `gcs` is what RAY_ADDRESS and ray.init take, `dashboard` the Jobs API."""

    gcs: str
    dashboard: str
    s3: S3Server


class _Session:
    """What the session started, lazily: a state folder, the S3 server, the Ray head."""

    def __init__(self):
        self.state: Path | None = None
        self.s3: S3Server | None = None
        self.head: subprocess.Popen | None = None
        self.ray_temp: str | None = None
        self.cluster: Cluster | None = None

    def start_s3(self) -> S3Server:
        if self.s3 is None:
            self.state = Path(tempfile.mkdtemp(prefix="emoji-ldm-tests-"))
            env = {**os.environ, "EMOJI_LDM_LOCAL": str(self.state), "S3_PORT": str(free_port())}
            r = subprocess.run([str(REPO / "infra" / "local_s3.sh"), "start"], env=env, capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"infra/local_s3.sh start failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            exported = dict(line.removeprefix("export ").split("=", 1)
                            for line in (self.state / "s3.env").read_text().splitlines() if line.startswith("export "))
            self.s3 = S3Server(exported.pop("AWS_ENDPOINT_URL"), credentials=exported)
            stop_with_this_process(pid=int((self.state / "s3.pid").read_text()))
        return self.s3

    def start_cluster(self) -> Cluster:
        """`ray start --head` as infra/local_ray_head.sh runs it (from the repository, .venv first on PATH, the
        S3 variables in its environment for its workers), on free ports: the dashboard agent's too, whose
        default port another Ray on the machine may hold (then the head takes no jobs)."""
        if self.cluster is None:
            s3 = self.start_s3()
            env = {**os.environ, **s3.env(), "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
                   "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
            env.pop("RAY_ADDRESS", None)
            # A temp dir of its own as RAY_TMPDIR (not `--temp-dir`), which the head's processes inherit: Ray's own
            # processes find their cluster there (`ray_current_cluster`). Ray Train's placement-group cleaner asks
            # the State API without an address; under `--temp-dir` it found another head of the machine, took the
            # run's controller for dead and quit, and the run waited up to 12 s for it at the end. Short: Ray's
            # socket paths stay within 107 bytes. One head starts at a time, so no two pick the same free port.
            self.ray_temp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
            env["RAY_TMPDIR"] = self.ray_temp
            # Without the log monitor, which infra/local_ray_head.sh keeps: it reads every worker's log ten times a
            # second to forward it to the drivers, and no test reads a worker's output through a driver (this
            # process joins with log_to_driver=False). 63 -> 8 CPU s over the suite (docs/development.md).
            with _machine_lock("ray-head-start"):
                port, dashboard = free_port(), free_port()
                self.head = start_ray_node(["--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard",
                                            "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                                            "--object-store-memory", "2000000000", "--include-log-monitor",
                                            "false"], env,
                                           log=self.state / "ray-head.log")
                wait_for_nodes(f"127.0.0.1:{port}", self.head, env, nodes=1)
            self.cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", s3)
            os.environ["RAY_ADDRESS"] = self.cluster.gcs  # subprocesses and in-process stages join it
        return self.cluster

    def stop(self) -> None:
        if self.cluster is not None:
            import ray

            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)
            self.cluster = None
        if self.head is not None:
            stop_ray_nodes([self.head])
            self.head = None
        if self.ray_temp is not None:
            shutil.rmtree(self.ray_temp, ignore_errors=True)
            self.ray_temp = None
        if self.s3 is not None:
            subprocess.run([str(REPO / "infra" / "local_s3.sh"), "stop"], capture_output=True, timeout=60,
                           env={**os.environ, "EMOJI_LDM_LOCAL": str(self.state)})
            self.s3 = None
        if self.state is not None:
            shutil.rmtree(self.state, ignore_errors=True)
            self.state = None


@contextlib.contextmanager
def _machine_lock(name: str):
    """An exclusive lock across this machine's processes (the xdist workers, another checkout's suite)."""
    with open(Path(tempfile.gettempdir()) / f"emoji-ldm-tests-{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start_ray_node(args: list[str], env: dict, log: Path | None = None) -> subprocess.Popen:
    """`ray start --block ARGS` (1 node) in a session of its own, from the repository: stopped by ending its
    process group (`ray stop` would stop every Ray on the machine, other tests' and other users' too)."""
    cmd = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(free_port()), *args]
    out = open(log, "w") if log else subprocess.DEVNULL
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stopped once its tests are done: no drain wait
    node = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            text=True, start_new_session=True)
    stop_with_this_process(group=node.pid)
    return node


def stop_with_this_process(pid: int | None = None, group: int | None = None) -> None:
    """SIGTERM to a process (or process group) once this test process is gone, however it ended (a suite
    killed at its time limit leaves no Ray node or S3 server running); nothing if it stopped first."""
    target = f"-{group}" if group else str(pid)
    watch = f"while kill -0 {os.getpid()} && kill -0 -- {target}; do sleep 2; done 2> /dev/null"
    subprocess.Popen(["bash", "-c", f"{watch}; kill -TERM -- {target} 2> /dev/null"], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_nodes(address: str, node: subprocess.Popen, env: dict, nodes: int) -> None:
    """Until `ray status` at `address` shows `nodes` alive nodes (at most 3 minutes)."""
    deadline = time.time() + 180
    while time.time() < deadline:
        assert node.poll() is None, f"ray start exited {node.returncode}: {node.args}"
        status = subprocess.run([str(VENV_BIN / "ray"), "status", "--address", address], env=env,
                                capture_output=True, text=True)
        if status.returncode == 0 and status.stdout.count("node_") >= nodes:
            return
        time.sleep(1)
    raise AssertionError(f"the Ray cluster at {address} did not reach {nodes} node(s) in 180 s")


def stop_ray_nodes(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM to each node's process group at once (each takes ~15 s to stop its processes); SIGKILL after a
    minute."""
    for node in nodes:
        _signal_group(node, signal.SIGTERM)
    for node in nodes:
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            _signal_group(node, signal.SIGKILL)
            node.wait(10)


def _signal_group(node: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(node.pid, sig)  # on SIGTERM the node's `ray start --block` stops what it started
    except ProcessLookupError:
        pass


_SESSION = _Session()


def shared_cluster() -> Cluster:
    """The session's Ray cluster (and S3 server), started on first use."""
    return _SESSION.start_cluster()


@pytest.fixture(scope="session", autouse=True)
def _session_services():
    """Stops what the session started (nothing, unless a test asked for Ray or S3)."""
    yield
    _SESSION.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Cluster:
    return shared_cluster()


def same_gcs(a: str, b: str) -> bool:
    """Two addresses of one local GCS: Ray reports it at the node's IP (192.0.2.2:6379) where it was joined
    at 127.0.0.1:6379, so the port (one cluster per port on this machine) decides."""
    return a.rsplit(":", 1)[-1] == b.rsplit(":", 1)[-1]


def connect(cluster: Cluster, again: bool = False) -> None:
    """Join the session's cluster from this process; already joined: nothing, unless `again`. Each
    `ray.shutdown()` here is a chance for Ray's own threads of this process to touch the worker after it, and
    one that does ends the whole pytest process (rc 1, no report), so this process re-joins only when it must."""
    import ray

    if ray.is_initialized():
        if same_gcs(ray.get_runtime_context().gcs_address, cluster.gcs) and not again:
            return
        ray.shutdown()
    ray.init(address=cluster.gcs, configure_logging=False, log_to_driver=False)


def cpus_held() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)


def wait_until_idle(cluster: Cluster, timeout: float = 120, settle: float = 15) -> None:
    """Every CPU of the cluster free again: what a module leaves running would starve the next one. A module
    whose CPUs are still held after `settle` s re-joins: a new job, so the actors this process owns end with
    the old one (a Ray Data run that failed keeps its map workers while anything holds its executor)."""
    deadline = time.time() + settle
    while cpus_held() > 0 and time.time() < deadline:
        time.sleep(0.5)
    if cpus_held() > 0:
        connect(cluster, again=True)
    deadline = time.time() + timeout
    while (held := cpus_held()) > 0:
        if time.time() > deadline:
            from ray.util.state import list_actors

            alive = [f"{a.class_name} ({a.state})" for a in list_actors(filters=[("state", "!=", "DEAD")], limit=100)]
            raise AssertionError(f"{held} CPUs still held {timeout:.0f} s after the module; actors: {alive}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_local(ray_cluster):
    """This process joined to the session's Ray (2 CPUs); yields its address (for RAY_ADDRESS). At the end of
    the module, waits until the module's work has released every CPU."""
    connect(ray_cluster)
    yield ray_cluster.gcs
    connect(ray_cluster)
    wait_until_idle(ray_cluster)


@pytest.fixture(scope="module")
def s3_server():
    """The session's S3-protocol server (moto_server, its own process on 127.0.0.1; in the test process it
    would deadlock with delta-rs, which holds the GIL while it waits for the server). The Ray cluster's
    workers have its variables from the start; this process has them for the module, restored afterwards."""
    server = _SESSION.start_s3()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
# --- a local HTTP site ----------------------------------------------------------


class Site:
    """Files by path, plus routes that misbehave: /slow/..., /status/404, /flaky/... (500 once)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.slow_s = 3.0
        self.server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"


def _handler(site: Site):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            with site.lock:
                site.hits[path] = site.hits.get(path, 0) + 1
                hits = site.hits[path]
            if path.startswith("/status/"):
                return self._send(int(path.rsplit("/", 1)[1]), b"error")
            if path.startswith("/flaky/"):
                if hits == 1:
                    return self._send(500, b"try again")
                path = "/" + path[len("/flaky/"):]
            if path.startswith("/slow/"):
                time.sleep(site.slow_s)
                path = "/" + path[len("/slow/"):]
            body = site.files.get(path)
            if body is None:
                return self._send(404, b"not found")
            return self._send(200, body, "application/octet-stream")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain"):
            try:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


@pytest.fixture
def http_site():
    site = Site()
    site.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(site))
    site.server.daemon_threads = True
    thread = threading.Thread(target=site.server.serve_forever, daemon=True)
    thread.start()
    yield site
    site.server.shutdown()
    site.server.server_close()
    thread.join(5)


# --- images --------------------------------------------------------------------


def png_bytes(color=(255, 0, 0, 255), size=(40, 30), mode="RGBA") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_bad_corpus(folder: Path) -> dict[str, str | None]:
    """Good and bad images on disk: file name -> expected reject reason (None = accepted). Of the accepted, two
    have alpha (palette_trns.png, grey_alpha.png) and five are opaque."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}

    (folder / "zero.png").write_bytes(b"")
    expected["zero.png"] = "empty"

    good = png_bytes((10, 200, 30, 255), (50, 50))
    (folder / "truncated.png").write_bytes(png_bytes((1, 2, 3, 255), (64, 64), "RGB")[:-40])
    expected["truncated.png"] = "truncated"

    (folder / "text.png").write_bytes(b"this is plain text, not a PNG\n" * 5)
    expected["text.png"] = "not_an_image"

    # 20000x20000: a decompression bomb by pixel count, small on disk.
    Image.new("1", (20000, 20000), 0).save(folder / "huge.png", optimize=False)
    expected["huge.png"] = "too_many_pixels"

    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg", format="JPEG")
    expected["cmyk.jpg"] = None

    arr = (np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 28).astype(np.uint16)
    Image.fromarray(arr).save(folder / "gray16.png")  # uint16 -> mode I;16
    expected["gray16.png"] = None

    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([255, 255, 255, 200, 0, 200] + [0] * 762)
    pal.info["transparency"] = 0
    pal.paste(0, (0, 0, 16, 32))
    pal.save(folder / "palette_trns.png", transparency=0)
    expected["palette_trns.png"] = None

    frames = [Image.new("RGB", (24, 24), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected["animated.gif"] = None

    (folder / "good.png").write_bytes(good)
    expected["good.png"] = None
    Image.new("RGB", (20, 40), (0, 0, 200)).save(folder / "tall.webp", format="WEBP")
    expected["tall.webp"] = None

    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(folder / "clear.png")  # alpha 0 everywhere: nothing to see
    expected["clear.png"] = "fully_transparent"

    la = Image.new("LA", (24, 24), (0, 0))  # grey with alpha: kept transparent
    la.paste((180, 255), (6, 6, 18, 18))
    la.save(folder / "grey_alpha.png")
    expected["grey_alpha.png"] = None
    return expected


# --- Chromium -------------------------------------------------------------------------

def new_chrome(download_dir: Path | None = None):
    """Headless Debian Chromium through Selenium (the library's launcher); the caller calls `.quit()`."""
    from emoji_ldm.crawl.browser import Browser

    return Browser(download_dir=str(download_dir) if download_dir else None)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `emoji-ldm ...` as a user would, in a subprocess that joins the session's Ray (RAY_ADDRESS) rather
    than starting its own; `env` may override that (RAY_ADDRESS="" for a Ray of its own)."""
    full_env = {**os.environ, "RAY_ADDRESS": shared_cluster().gcs, **(env or {})}
    return subprocess.run(
        [str(VENV_BIN / "emoji-ldm"), *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture
def cli_in_process(capsys):
    """`emoji-ldm ARGS` in this process, for input checks that fail before any Ray work (and commands that need
    no Ray at all): returns (exit code, stderr), and leaves stdout in `.out`. A subprocess costs a Python start
    (and its imports) per case; this costs nothing. During the call, reaching Ray fails the test (`ensure_ray`
    and `ray.init` refuse), so a check that moved behind the cluster is caught rather than run on the session's
    Ray from the test process."""
    import ray

    from emoji_ldm.cli import main as cli
    from emoji_ldm.runtime import connect

    def refuse(*args, **kwargs):
        raise AssertionError("this input reached Ray; it should be refused before Ray is needed")

    def call(*args: str) -> tuple[int, str]:
        """(exit code, stderr); the call's stdout is `call.out` afterwards."""
        # not `serve`: however it ends, it shuts Serve and Ray down in the calling process (here: the test's)
        assert args[0] != "serve", "run `serve` as a process (run_cli)"
        capsys.readouterr()
        original = connect.ensure_ray
        try:
            with pytest.MonkeyPatch.context() as patch:
                for module in list(sys.modules.values()):  # bound by `from ... import ensure_ray` too
                    if getattr(module, "ensure_ray", None) is original:
                        patch.setattr(module, "ensure_ray", refuse)
                patch.setattr(ray, "init", refuse)
                code = cli.main(list(args))
        finally:  # a module first imported during the call bound the refusal at its top: give it the original
            for module in list(sys.modules.values()):
                if getattr(module, "ensure_ray", None) is refuse:
                    module.ensure_ray = original
        captured = capsys.readouterr()
        call.out = captured.out
        return code, captured.err

    return call


# --- the tiny pipeline, once per session ----------------------------------------------------

# few steps, small UNet: the settings of every short training run in the suite
FAST = {"train.log_every": 1, "train.sample_every": 0, "train.checkpoint_every": 3, "train.warmup_steps": 1,
        "unet.block_out_channels": "32,64", "train.batch_size": 8}


def pipeline_speed():
    """The session pipeline's fast path: bf16 with channels-last and gradient checkpointing, as a cluster trains
    (DeepSpeed bf16 on CPU); a run that is compared with the pipeline's uses it too."""
    from emoji_ldm.train.speed import SpeedOptions

    return SpeedOptions(precision="bf16", channels_last=True, gradient_checkpointing=True)


def train_fast(data: str, out, **kwargs) -> dict:
    """`train` of the tiny preset on latent table DATA into OUT with the `FAST` settings (plus `overrides`)."""
    from emoji_ldm.train.ldm import TrainConfig, train

    overrides = {**FAST, **kwargs.pop("overrides", {})}
    return train(TrainConfig(data=data, out=str(out), overrides=overrides, **kwargs))


@dataclass
class Pipeline:
    """What the `pipeline` fixture made; shared by many tests, so read it, never write to it."""

    root: Path
    ds: str  # the dataset: v0 build (44 Twemoji), v1 build (4 synthetic), v2 metadata caption pass
    vae: str  # the tiny VAE, 4 steps on 1 worker (2 workers: test_train_loop's VAE runs, the RayJob encode)
    lat: str  # the latent table of v2
    run: Path  # 4 training steps of the tiny UNet, ZeRO-2 on 2 workers in bf16 (`pipeline_speed`), samples at 2 and 4
    builds: list
    caption: dict
    vae_card: dict
    encoded: dict
    card: dict  # what train returned (the run's model card)

    @property
    def model(self) -> str:
        return str(self.run / "model")


@pytest.fixture(scope="session")
def pipeline(ray_cluster, tmp_path_factory) -> Pipeline:
    """build -> caption -> train-vae -> encode -> train of the tiny preset, once for the session: the training,
    eval, lineage and two-node tests start from it; tests that need another configuration run their own."""
    from emoji_ldm.caption.stage import CaptionConfig, caption_dataset
    from emoji_ldm.ingest.build import BuildConfig, build_dataset
    from emoji_ldm.train.encode import EncodeConfig, encode
    from emoji_ldm.train.ldm import TrainConfig, train
    from emoji_ldm.train.vae import VAETrainConfig, train_vae

    connect(ray_cluster)
    root = tmp_path_factory.mktemp("pipeline")
    ds, vae, lat, run = str(root / "ds"), str(root / "vae"), str(root / "lat"), root / "run"
    builds = [build_dataset(BuildConfig(source="twemoji", out=ds, limit=44, message="first")),
              build_dataset(BuildConfig(source="synthetic:4:1", out=ds))]
    caption = caption_dataset(CaptionConfig(dataset=ds))
    vae_card = train_vae(VAETrainConfig(dataset=ds, out=vae, max_steps=4, workers=1))  # a run costs ~13 CPU s a worker
    encoded = encode(EncodeConfig(dataset=ds, out=lat, vae=vae))
    card = train(TrainConfig(data=lat, out=str(run), max_steps=4, zero_stage=2, speed=pipeline_speed(),
                             overrides={**FAST, "train.sample_every": 2}))
    return Pipeline(root, ds, vae, lat, run, builds, caption, vae_card, encoded, card)

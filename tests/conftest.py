"""Shared fixtures: one local Ray per module, a real moto_server S3 process, a local HTTP site.

Everything listens on 127.0.0.1 only and is stopped at teardown.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

os.environ.setdefault("RAY_ACCEPT_LOCAL_EXECUTION_WARNINGS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(items):
    """Every integration test is slow (Ray, servers, a browser); `make test-fast` runs the rest."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the whole module (2 CPUs, no dashboard), its own even when another
    `ray start` runs on the machine (address="local")."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# --- S3 ----------------------------------------------------------------------

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}


class S3Server:
    def __init__(self, endpoint: str, proc: subprocess.Popen):
        self.endpoint = endpoint
        self.proc = proc

    def env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")


def start_moto(extra_env: dict | None = None) -> S3Server:
    """Start moto_server as its own process on a free loopback port and wait until it listens."""
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


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-protocol server (moto_server) as its own process on 127.0.0.1.

    It must not run inside the test process: delta-rs holds the GIL while it
    waits for the server, which would deadlock an in-process server.
    The AWS variables point at it for the module and are restored afterwards.
    Request it before `ray_local` so Ray's workers inherit the variables.
    """
    server = start_moto()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    stop_moto(server)


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
    """Good and bad images on disk: file name -> expected reject reason (None = accepted)."""
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
    return expected


# --- Chromium -------------------------------------------------------------------------

def new_chrome(download_dir: Path | None = None):
    """Headless Debian Chromium through Selenium (the library's launcher); the caller calls `.quit()`."""
    from emoji_ldm.crawl.browser import Browser

    return Browser(download_dir=str(download_dir) if download_dir else None)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `emoji-ldm ...` as a user would, in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(VENV_BIN / "emoji-ldm"), *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )

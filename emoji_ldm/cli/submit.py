"""Run any stage on a Ray cluster as a Ray Job: `emoji-ldm submit` and `emoji-ldm jobs`.

Input: a stage name and that stage's own flags; a Ray dashboard address
(`http://HEAD:8265`, the head's port 8265; on Kubernetes `kubectl port-forward`
the head service). Output: a Ray Job whose entrypoint is the stage's
`ray_jobs/` script, the same command a KubeRay RayJob runs, followed to its end.

Public entry points: `submit(SubmitConfig)`, `list_jobs`, `job_logs`, `stop_job`.

The job's code comes from one of two places:
- a working dir (default, when emoji-ldm runs from a source checkout): the
  checkout is uploaded (Ray honours .gitignore) and the entrypoint is
  `python ray_jobs/<stage>.py FLAGS`, exactly as in `k8s/base/rayjob.*.yaml`;
- `--installed`: nothing is uploaded; the entrypoint is `emoji-ldm <command>
  FLAGS` from the package installed in the cluster's image (infra/Dockerfile).
S3 settings are the cluster's own (on Kubernetes, the pods read them from the
`emoji-ldm-s3-ZONE` Secret); `--env K=V` or `--forward-aws` adds variables to the
job's runtime_env.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from emoji_ldm.cli.commands import STAGES, parse_config
from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.version import code_version

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP")
HINT = ("start one with infra/local_ray_head.sh, or on Kubernetes run "
        "`kubectl -n emoji-ldm port-forward svc/emoji-head-svc 8265`")


def checkout_root() -> Path | None:
    """The source checkout this package runs from (it has ray_jobs/ beside emoji_ldm/), if any."""
    root = Path(__file__).resolve().parents[2]  # emoji_ldm/cli/submit.py -> the checkout
    return root if (root / "ray_jobs").is_dir() and (root / "emoji_ldm").is_dir() else None


def default_address() -> str:
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return ""


@dataclass(frozen=True)
class SubmitConfig:
    stage: str = opt(positional=True, help=f"the stage to run: {' | '.join(STAGES)}")
    # the stage's own flags: every flag of the command line that submit does not know
    args: tuple[str, ...] = opt((), cli=False, help="the stage's flags")
    address: str = opt("", help="Ray dashboard URL, http://HEAD:8265 "
                                "(default: $RAY_API_SERVER_ADDRESS or an http:// $RAY_ADDRESS)")
    working_dir: str | None = opt(None, help="the checkout to upload (default: the one emoji-ldm runs from)")
    installed: bool = opt(False, help="upload nothing: run the emoji-ldm installed in the cluster's image")
    env: dict[str, str] = opt(default_factory=dict, help="a variable for the job (repeatable)")
    forward_aws: bool = opt(False, help="copy this shell's AWS_* variables into the job (they show in the "
                                        "job's info)")
    # the stage's workers ask for their own resources; these are the driver's
    num_cpus: float = opt(0.0, flag="entrypoint-num-cpus", help="CPUs reserved for the driver")
    num_gpus: float = opt(0.0, flag="entrypoint-num-gpus", help="GPUs reserved for the driver")
    wait: bool = opt(True, flag="no-wait", invert=True, help="print the job id and return instead of following")
    submission_id: str = opt("", help="the job id (default emoji-ldm-STAGE-TIME-HEX)")

    def __post_init__(self):
        if self.stage not in STAGES:
            raise UserError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        object.__setattr__(self, "address", self.address or default_address())
        check_address(self.address)
        if self.installed and self.working_dir:
            raise UserError("give --working-dir or --installed, not both")
        script = STAGES[self.stage].script
        if not self.installed:
            root = self.working_dir or checkout_root()
            if root is None:
                raise UserError("this emoji-ldm is not a source checkout, so there is no ray_jobs/ to upload: "
                                "pass --working-dir CHECKOUT, or --installed to run the image's emoji-ldm")
            root = Path(root)
            if not (root / "ray_jobs" / script).is_file():
                raise UserError(f"--working-dir {str(root)!r} has no ray_jobs/{script}; "
                                "give the root of an emoji-ldm checkout")
            object.__setattr__(self, "working_dir", str(root.resolve()))
        for key in self.env:
            if not key or not key.replace("_", "").isalnum():
                raise UserError(f"--env {key!r} is not a variable name; write --env NAME=VALUE")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise UserError(f"--entrypoint-num-cpus {self.num_cpus} / --entrypoint-num-gpus {self.num_gpus} "
                            "must be 0 or more")
        check_stage_args(self.stage, list(self.args))


def check_address(address: str) -> None:
    if not address:
        raise UserError(f"no Ray cluster given: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS); "
                        f"{HINT}")
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(f"--address {address!r} is not a Ray dashboard URL like http://HEAD:8265")


def check_stage_args(stage: str, args: list[str]) -> None:
    """Build the stage's config from its flags here, so a typo or a bad value fails before the cluster sees it."""
    parse_config(STAGES[stage], args)


def entrypoint(stage: str, args: list[str], installed: bool = False) -> str:
    command = STAGES[stage]
    head = ["emoji-ldm", *command.words] if installed else ["python", f"ray_jobs/{command.script}"]
    return shlex.join([*head, *args])


def _quiet_sdk_logs() -> None:
    # the SDK logs every .gitignore it honours and every default exclude at INFO/WARNING
    for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(address: str):
    """A JobSubmissionClient for the dashboard at `address`, or a UserError that says how to get one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    check_address(address)
    _quiet_sdk_logs()
    given = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    # Ray's SDK replaces the address it is given with $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS when either is set
    # (inside a Ray pod, or beside a local `ray start`, RAY_ADDRESS often is): then `--address` would be ignored and
    # the job go to that other cluster. Here the address we resolved (the flag, else those variables) wins.
    hidden = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        if given:
            raise UserError(f"the Ray cluster at {address} refused the token in RAY_AUTH_TOKEN"
                            f"{'_PATH' if not os.environ.get('RAY_AUTH_TOKEN') else ''}: it is not this cluster's "
                            "(`ray get-auth-token` on the head, or its emoji-ldm-ray-token-ZONE Secret, has it)"
                            ) from None
        raise UserError(f"the Ray cluster at {address} uses token authentication: set RAY_AUTH_TOKEN (or "
                        "RAY_AUTH_TOKEN_PATH) to its token, which `ray get-auth-token` prints on the head") from None
    except (ConnectionError, OSError) as e:
        raise UserError(f"cannot reach a Ray dashboard at {address} ({str(e).splitlines()[0][:200]}); {HINT}") from None
    finally:
        os.environ.update(hidden)


def require_job(client, job_id: str, address: str) -> None:
    """A UserError when the cluster has no job `job_id`, told by the HTTP status of the job's info (404).

    `JobSubmissionClient`'s public methods raise a bare RuntimeError with the status only in its text, so ask
    the same endpoint `get_job_info` asks through the SDK's request method (which adds the cluster's token and
    headers) and read the status code."""
    response = client._do_request("GET", f"/api/jobs/{job_id}")
    if response.status_code == 404:
        raise UserError(f"no job {job_id!r} on {address}; `emoji-ldm jobs list` shows them")
    if response.status_code != 200:
        client._raise_error(response)


def submit(config: SubmitConfig) -> int:
    """Submit the stage as a Ray Job; with `wait`, follow its logs and return 0 only if it succeeded."""
    client = connect(config.address)
    env = dict(config.env)
    if config.forward_aws:
        env = {**{k: os.environ[k] for k in AWS_VARS if k in os.environ}, **env}
    runtime_env: dict = {"env_vars": env} if env else {}
    if config.working_dir:
        runtime_env["working_dir"] = config.working_dir
    submission_id = config.submission_id or (
        f"emoji-ldm-{config.stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    command = entrypoint(config.stage, list(config.args), config.installed)
    try:
        job_id = client.submit_job(
            entrypoint=command, runtime_env=runtime_env or None, submission_id=submission_id,
            entrypoint_num_cpus=config.num_cpus or None, entrypoint_num_gpus=config.num_gpus or None,
            metadata={"emoji_ldm_stage": config.stage, "emoji_ldm_version": code_version()})
    except RuntimeError as e:
        raise UserError(f"the cluster at {config.address} refused the job: {str(e)[:500]}") from None
    source = f"working dir {config.working_dir}" if config.working_dir else "the installed emoji-ldm"
    print(f"submitted {job_id} to {config.address} ({source}): {command}", flush=True)
    if not config.wait:
        print(f"follow it with: emoji-ldm jobs logs {job_id} --follow --address {config.address}")
        return 0
    return follow(client, job_id, config.address)


def follow(client, job_id: str, address: str) -> int:
    """Print the job's logs as they come, then its final status; 0 if it succeeded, 1 if not."""

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
        status = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: emoji-ldm jobs stop {job_id} --address {address}")
        return 130
    info = client.get_job_info(job_id)
    if status == "SUCCEEDED":
        print(f"job {job_id} succeeded")
        return 0
    code = f", exit code {info.driver_exit_code}" if info.driver_exit_code is not None else ""
    reason = (info.message or "").split(", last available logs")[0].strip()  # the logs were printed above
    print(f"job {job_id} {status.lower()}{code}: {reason}".rstrip(": "))
    return 1


def _wait_terminal(client, job_id: str, timeout_s: float = 60) -> str:
    deadline = time.time() + timeout_s
    while True:  # the log stream can end a moment before the status is final
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.time() > deadline:
            return status
        time.sleep(0.2)


def list_jobs(address: str) -> list[dict]:
    """Every job the cluster knows, newest first, as plain dicts."""
    client = connect(address)
    rows = []
    for job in client.list_jobs():
        start, end = job.start_time, job.end_time
        rows.append({
            "id": job.submission_id or job.job_id, "status": str(job.status.value),
            "stage": (job.metadata or {}).get("emoji_ldm_stage", "-"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start / 1000)) if start else "-",
            "seconds": round(((end or time.time() * 1000) - start) / 1000) if start else None,
            "entrypoint": job.entrypoint,
        })
    return sorted(rows, key=lambda r: r["started"], reverse=True)


def format_jobs(rows: list[dict]) -> str:
    if not rows:
        return "no jobs on this cluster yet"
    lines = [f"{'ID':<44} {'STATUS':<10} {'STAGE':<10} {'STARTED':<20} {'SECS':>6}  ENTRYPOINT"]
    for r in rows:
        secs = "-" if r["seconds"] is None else str(r["seconds"])
        lines.append(f"{r['id']:<44} {r['status']:<10} {r['stage']:<10} {r['started']:<20} {secs:>6}  "
                     f"{r['entrypoint'][:80]}")
    return "\n".join(lines)


def job_logs(address: str, job_id: str, follow_logs: bool = False) -> int:
    client = connect(address)
    require_job(client, job_id, address)
    if follow_logs:
        return follow(client, job_id, address)
    print(client.get_job_logs(job_id), end="")
    return 0


def stop_job(address: str, job_id: str, wait: bool = True) -> str:
    """Ask the job to stop; with `wait`, return its final status."""
    client = connect(address)
    require_job(client, job_id, address)
    client.stop_job(job_id)
    return _wait_terminal(client, job_id) if wait else str(client.get_job_status(job_id).value)


# --- `emoji-ldm jobs list|logs|stop` ---

_ADDRESS_HELP = "Ray dashboard URL, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)"


@dataclass(frozen=True)
class JobsListConfig:
    address: str = opt("", help=_ADDRESS_HELP)


@dataclass(frozen=True)
class JobLogsConfig:
    job_id: str = opt(positional=True, help="the job's submission id (`emoji-ldm jobs list`)")
    follow: bool = opt(False, help="follow until the job ends; exit 1 unless it succeeded")
    address: str = opt("", help=_ADDRESS_HELP)


@dataclass(frozen=True)
class JobStopConfig:
    job_id: str = opt(positional=True, help="the job's submission id (`emoji-ldm jobs list`)")
    wait: bool = opt(True, flag="no-wait", invert=True, help="return once asked, without waiting for the end")
    address: str = opt("", help=_ADDRESS_HELP)


def list_command(config: JobsListConfig) -> str:
    return format_jobs(list_jobs(config.address or default_address()))


def logs_command(config: JobLogsConfig) -> int:
    return job_logs(config.address or default_address(), config.job_id, follow_logs=config.follow)


def stop_command(config: JobStopConfig) -> str:
    status = stop_job(config.address or default_address(), config.job_id, wait=config.wait)
    return f"job {config.job_id}: {status}"


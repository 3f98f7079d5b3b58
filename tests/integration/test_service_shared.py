"""The service shared by three keys on a real Serve (tiny model, jobs and sets on local disk beside the model and a
dataset, as `make demo` lays them out, one job drawing at a time): `heavy` past its cost budget is refused with what
the job costs and what is left, `light`'s job starts while `heavy` is refused, `full` at its stored-bytes quota is
refused; `many` posts 50 jobs and `one` a single job after them, which starts before many's third; and retention,
run as if every file were long expired, deletes nothing outside its own jobs and sets."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import pytest

from tests.serving import HTTP, deploy, get, post, stop_runners, wait_for
from tests.tiny_models import tiny_model_with_card


def _keys(path: str) -> dict[str, str]:
    from emoji_ldm.serve.keys import KeysCreateConfig, create_command, read_keys, write_keys

    made = {name: create_command(KeysCreateConfig(file=path, name=name, max_jobs=60 if name == "many" else 4)
                                 ).splitlines()[2] for name in ("heavy", "light", "full", "many", "one")}
    keys = read_keys(path)
    keys["heavy"] = dataclasses.replace(keys["heavy"], cost_per_minute=1, cost_budget=10)
    keys["full"] = dataclasses.replace(keys["full"], max_stored_bytes=200 * 1024)
    keys["many"] = dataclasses.replace(keys["many"], rate_per_minute=1000)  # 50 posts, then 50 cancels
    write_keys(path, keys)
    return made | {f"{name}-id": k.id for name, k in keys.items()}


@pytest.fixture(scope="module")
def shared(ray_local, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("shared")
    model = str(tiny_model_with_card(root / "model"))
    (root / "data" / "_delta_log").mkdir(parents=True)
    (root / "data" / "_delta_log" / "00000000000000000000.json").write_text("{}")
    keys = _keys(str(root / "keys.json"))
    full_old = root / "jobs" / keys["full-id"] / "job-20261101-000000-0000000f"
    full_old.mkdir(parents=True)
    (full_old / "result.zip").write_bytes(b"\0" * (100 * 1024))  # what `full` already stores
    url = deploy(model, keys=str(root / "keys.json"), jobs_uri=str(root / "jobs"), sets_uri=str(root / "sets"),
                 job_num_cpus=0.5, sweep_s=1.0, job_slots=1)
    yield {"url": url, "keys": keys, "root": root, "model": model}
    serve.shutdown()
    stop_runners()


def _auth(shared, name: str) -> dict:
    return {"authorization": f"Bearer {shared['keys'][name]}"}


def _job(n: int) -> dict:
    return {"theme": "blob", "items": [f"item {i}" for i in range(n)], "steps": 2}


def test_three_keys_share_the_service(shared):
    jobs = f"{shared['url']}/v1/jobs"
    first = post(jobs, _job(3), _auth(shared, "heavy"))  # 6 of its 10 units
    assert first.status == 202, first.data
    refused = post(jobs, _job(3), _auth(shared, "heavy"))
    body = json.loads(refused.data)
    assert refused.status == 429 and body["quota"] == "cost", body
    assert body["cost_units"] == 6 and body["cost_units_left"] == 4 and int(refused.headers["Retry-After"]) >= 60
    never = post(jobs, _job(6), _auth(shared, "heavy"))
    assert never.status == 429 and "split it" in json.loads(never.data)["error"], never.data

    light = post(jobs, _job(2), _auth(shared, "light"))
    assert light.status == 202, light.data
    job_id = json.loads(light.data)["id"]

    def started():
        state = json.loads(get(f"{jobs}/{job_id}", _auth(shared, "light")).data)
        return state if state["state"] in ("running", "succeeded") else None

    wait_for(started, 120, "the light user's job to start")

    full = post(jobs, _job(3), _auth(shared, "full"))
    body = json.loads(full.data)
    assert full.status == 429 and body["quota"] == "stored_bytes", body
    assert body["stored_bytes_left"] == 100 * 1024


def test_a_sets_location_over_the_model_refuses_to_start(shared):
    from emoji_ldm.errors import UserError

    with pytest.raises(UserError, match="overlaps model"):
        deploy(shared["model"], keys=str(shared["root"] / "keys.json"), sets_uri=str(shared["root"]),
               same_serve=True, name="overlap", route_prefix="/overlap")


def test_a_key_with_one_job_starts_before_the_third_of_a_key_with_fifty(shared):
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from emoji_ldm.serve.placement import NAMESPACE, QUEUE_NAME

    jobs = f"{shared['url']}/v1/jobs"

    def many(n: int) -> str:
        answer = post(jobs, {"prompts": [f"blob {n}"], "steps": 2}, _auth(shared, "many"))
        assert answer.status == 202, answer.data
        return json.loads(answer.data)["id"]

    with ThreadPoolExecutor(4) as pool:  # in any order among themselves
        heavy = list(pool.map(many, range(49)))
    heavy.append(many(49))  # after all of them
    single = post(jobs, {"prompts": ["one blob"], "steps": 2}, _auth(shared, "one"))
    assert single.status == 202, single.data
    one = json.loads(single.data)["id"]
    queue = ray.get_actor(QUEUE_NAME, namespace=NAMESPACE)

    def turns() -> list[str]:
        return [job_id for _, _, job_id in ray.get(queue.snapshot.remote())["turns"]]

    started_before = set(turns())  # many's jobs that ran while the 50 were posted (how many depends on the machine)
    last, earlier = (json.loads(get(f"{jobs}/{j}", _auth(shared, "many")).data) for j in (heavy[-1], heavy[-2]))
    if last["state"] == "queued":  # its place in line and the priority it waits at
        assert last["queue"]["priority"] == "normal", last
        if earlier["state"] == "queued":  # posted before it and read after it (a place only moves forward)
            assert earlier["queue"]["position"] < last["queue"]["position"], (earlier, last)
    assert get(f"{jobs}/{one}", _auth(shared, "many")).status == 404  # another key's job

    def started() -> list[str] | None:
        granted = turns()
        return granted if one in granted else None

    granted = wait_for(started, 180, "the single job to start")
    ours = [j for j in granted if j == one or (j in heavy and j not in started_before)]
    assert ours.index(one) <= 2, ours[:5]  # before the third of many's jobs still waiting when it came
    with ThreadPoolExecutor(4) as pool:  # the rest, cancelled while they wait: they end at once, in no slot
        assert all(r.status == 202 for r in pool.map(
            lambda j: HTTP.request("DELETE", f"{jobs}/{j}", headers=_auth(shared, "many")), heavy))
    wait_for(lambda: not _running(), 240, "the cancelled jobs to end")
    ended = {j: json.loads(get(f"{jobs}/{j}", _auth(shared, "many")).data)["state"] for j in heavy}
    never_ran = set(heavy) - set(turns())
    assert set(ended.values()) <= {"succeeded", "cancelled"}, ended
    assert never_ran and {ended[j] for j in never_ran} == {"cancelled"}, ended


def test_retention_deletes_nothing_outside_its_jobs_and_sets(shared):
    """Every job ended, every file as if long past the period: what is left is everything but the jobs and sets."""
    from emoji_ldm.serve.jobs.retention import expire_jobs, expire_sets

    root = shared["root"]
    wait_for(lambda: not _running(), 180, "the jobs to end")
    (root / "sets" / "set-20261101-000000-0000000a").mkdir(parents=True)
    (root / "sets" / "set-20261101-000000-0000000a" / "manifest.json").write_text("{}")
    (root / "sets" / "notes.txt").write_text("an operator's file beside the sets")
    (root / "jobs" / "backup" / "old").mkdir(parents=True)
    (root / "jobs" / "backup" / "old" / "x.bin").write_bytes(b"x")
    outside = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] not in
               ("jobs", "sets")}
    later = time.time() + 365 * 86400
    assert expire_jobs(str(root / "jobs"), 7, now=later) >= 2
    assert expire_sets(str(root / "sets"), 7, now=later) == 1
    assert {p: p.read_bytes() for p in outside} == outside  # the model, the dataset, the key file
    left = sorted(str(p.relative_to(root)) for p in (root / "jobs").rglob("*") if p.is_file())
    assert "jobs/backup/old/x.bin" in left and not [n for n in left if re.match(r"jobs/key-[0-9a-f]{16}/job-", n)], left
    assert (root / "sets" / "notes.txt").exists() and not (root / "sets" / "set-20261101-000000-0000000a").exists()
    assert os.path.exists(shared["model"])
    HTTP.clear()


def _running() -> bool:
    import ray

    from emoji_ldm.serve.placement import NAMESPACE, job_queue

    queue = job_queue()
    waiting = ray.get(queue.snapshot.remote())["waiting"] if queue is not None else 0
    return waiting > 0 or any(a["namespace"] == NAMESPACE and a["name"].startswith("job:")
                              for a in ray.util.list_named_actors(all_namespaces=True))

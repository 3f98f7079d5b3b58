"""One cost model for every route (serve/jobs/quota.py, serve/meter.py): a durable job is charged at admission for
images x frames x (1 + redraws) x steps x (size/64)^2 against the key's budget, the one /v1/generate and
/v1/emoji-sets draw from, refunded on cancel; a key has a stored-bytes quota; either refusal is a 429 JSON with
what the job would take and what is left. The jobs routes run in process with the meter's decisions as the actor
makes them (`Meter`, no Ray: the runner is never reached by a refused job)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from emoji_ldm.serve import meter
from emoji_ldm.serve.http import new_api
from emoji_ldm.serve.jobs.routes import JobRoutes
from emoji_ldm.serve.keys import KeyRing, KeysCreateConfig, create_command, read_keys, write_keys
from emoji_ldm.serve.meter import Meter, cost_units
from emoji_ldm.serve.schemas import JobRequest
from tests.unit.test_auth import call


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def service(tmp_path, monkeypatch):
    """The jobs routes of one ingress with keys; the meter a local `Meter` on a hand clock, asked as the actor is."""
    from emoji_ldm.serve.app import AppArgs

    path = str(tmp_path / "keys.json")
    keys = {}
    for name in ("heavy", "light"):
        keys[name] = create_command(KeysCreateConfig(file=path, name=name, rate=100_000, max_jobs=8)).splitlines()[2]
    stored = read_keys(path)
    stored["light"] = dataclasses.replace(stored["light"], max_stored_bytes=10 * 2**20)
    write_keys(path, stored)
    clock = Clock()
    local = Meter(clock=clock, live=lambda owner: set())

    async def ask(method, *args):
        return getattr(local, method)(*args)

    monkeypatch.setattr(meter, "ask", ask)
    ring = KeyRing(path)
    args = AppArgs(model="unused", keys=path, jobs_uri=str(tmp_path / "jobs"), retention_days=0)
    api = new_api(ring)
    routes = JobRoutes(args, ring, model_card=_card(256))
    routes.add_to(api)

    def post(name: str, body: dict):
        status, headers, data = call(api, "POST", "/v1/jobs", headers={"authorization": f"Bearer {keys[name]}",
                                                                       "content-type": "application/json"},
                                     body=json.dumps(body).encode())
        return status, headers, json.loads(data)

    return {"post": post, "meter": local, "ring": ring, "clock": clock, "routes": routes}


def _card(size: int):
    async def card():
        return {"image_size": size}
    return card


def test_a_job_over_the_keys_budget_is_refused_with_its_cost_and_what_is_left(service):
    """The finding: 4,096 images x 1,000 steps at 256 px got 202, while a set 1/256 of its size got 429."""
    body = {"prompts": [f"p{i}" for i in range(4096)], "steps": 1000}
    status, headers, data = service["post"]("heavy", body)
    assert status == 429, data
    heavy = service["ring"].by_name("heavy")
    assert data["quota"] == "cost" and data["cost_units"] == cost_units(4096, 1000, 256)
    assert data["cost_units_left"] == heavy.budget and data["cost_budget"] == heavy.budget
    assert "costs" in data["error"] and "split it" in data["error"]


def test_redraws_and_frames_are_charged(service):
    from emoji_ldm.serve.jobs.quota import job_cost

    still = JobRequest(prompts=["a"], steps=10)
    loop = JobRequest(prompts=["a"], steps=10, animation={"frames": 8})
    legible = JobRequest(prompts=["a"], steps=10, min_legibility=0.5)
    assert job_cost(still, 64) == 10
    assert job_cost(loop, 64) == 80
    assert job_cost(legible, 64) == 10 * (1 + legible.max_redraws)
    assert job_cost(still, 128) == 40


def test_jobs_and_requests_draw_from_one_budget_and_a_cancel_refunds(service):
    """A job that takes most of the budget leaves too little for the next job and for a request (the same
    `budget:` bucket); its refund on cancel gives back what it did not draw, once."""
    m, clock = service["meter"], service["clock"]
    heavy = service["ring"].by_name("heavy")
    budget, rate = heavy.budget, heavy.cost_per_minute
    big = budget - rate / 2  # half a minute's worth left
    assert m.admit_job(heavy.owner, "job-a", 8, big, rate, budget, 0, 0, heavy.max_stored_bytes) == {"ok": True}
    refused = m.admit_job(heavy.owner, "job-b", 8, big, rate, budget, 0, 0, heavy.max_stored_bytes)
    assert refused["refused"] == "cost" and refused["left"] == pytest.approx(rate / 2)
    assert refused["wait_s"] > 0
    assert m.admit_job(heavy.owner, "job-a", 8, big, rate, budget, 0, 0, heavy.max_stored_bytes)["ok"]  # replay
    assert m.spend(heavy.owner, rate, rate, budget) > 0  # a minute's request: the budget holds half
    assert m.refund(heavy.owner, "job-a", 0.5, rate, budget) == pytest.approx(big / 2)
    assert m.refund(heavy.owner, "job-a", 0.5, rate, budget) == 0  # once
    assert m.spend(heavy.owner, rate, rate, budget) == 0
    clock.now += 3600
    assert m.admit_job(heavy.owner, "job-c", 8, big, rate, budget, 0, 0, heavy.max_stored_bytes)["ok"]  # refilled


def test_a_key_at_its_stored_bytes_quota_is_refused(service, tmp_path):
    """`light` may store 10 MiB: a job whose result may take more than what is left gets a 429 naming both; what
    its jobs folder already holds counts."""
    light = service["ring"].by_name("light")
    folder = tmp_path / "jobs" / light.owner / "job-old"
    folder.mkdir(parents=True)
    (folder / "result.zip").write_bytes(b"\0" * (9 * 2**20))
    status, _, data = service["post"]("light", {"prompts": ["a"] * 4, "steps": 1})  # 4 x 256^2 x 8 > 1 MiB
    assert status == 429 and data["quota"] == "stored_bytes", data
    assert data["stored_bytes_left"] == 10 * 2**20 - 9 * 2**20 and data["would_store_bytes"] > 2**20
    assert "stored bytes" in data["error"]


def test_admitted_jobs_count_against_the_bytes_quota_before_their_output_exists(service):
    m = service["meter"]
    light = service["ring"].by_name("light")
    most, rate, budget = light.max_stored_bytes, light.cost_per_minute, light.budget
    assert m.admit_job(light.owner, "job-1", 8, 1, rate, budget, most // 2, 0, most)["ok"]
    assert m.admit_job(light.owner, "job-2", 8, 1, rate, budget, most // 2, 0, most)["ok"]
    assert m.admit_job(light.owner, "job-3", 8, 1, rate, budget, 1, 0, most)["refused"] == "bytes"

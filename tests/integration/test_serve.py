"""Real Ray Serve on a local Ray: the HTTP API, batching, bad input, emoji sets into S3, the web page in Chromium."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.conftest import new_chrome
from tests.serving import assert_same_image, deploy, get, post
from tests.tiny_models import tiny_lora, tiny_model_with_card

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def served(s3_server, ray_local, tmp_path_factory):
    """The app on a tiny model; sets are stored in a moto S3 bucket. Small queues so overload is testable."""
    from ray import serve

    s3_server.client().create_bucket(Bucket="sets")
    root = tmp_path_factory.mktemp("serve")
    model = tiny_model_with_card(root / "model", guidance=2.5)  # its own guidance, as pixel32's card names
    lora = tiny_lora(model, root / "my-cat")  # a personal adapter on this base, chosen per request
    url = deploy(str(model), sets_uri="s3://sets/emoji",
                 generator={"max_ongoing_requests": 4, "max_queued_requests": 4, "num_replicas": 1},
                 ingress={"max_ongoing_requests": 100, "max_queued_requests": 100}, channels_last=True,
                 adapters={"my-cat": str(lora)})
    yield {"url": url, "model": str(model), "s3": s3_server}
    serve.shutdown()


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def b64png(text: str) -> Image.Image:
    return png(base64.b64decode(text))


def test_health_model_card_and_openapi(served):
    health = get(served["url"] + "/healthz")
    assert health.status == 200 and health.json() == {"status": "ok"}  # open to anyone: no model URI
    card = get(served["url"] + "/v1/model").json()
    assert card["dataset"] == "s3://data/emoji" and card["dataset_version"] == 3 and card["image_size"] == 32
    assert card["guidance"] == 2.5
    assert card["runtime"] == {"device": "cpu", "dtype": "float32", "vae_dtype": "float32", "compiled": False,
                               "warmup_s": None}  # dtype auto: fp32 on CPU
    schema = get(served["url"] + "/openapi.json").json()
    assert {"/v1/generate", "/v1/emoji-sets", "/healthz", "/v1/model"} <= set(schema["paths"])
    page = get(served["url"] + "/")
    assert page.status == 200 and b"emoji-ldm" in page.data
    # no keys: a local server, so a page elsewhere that rebinds its name to 127.0.0.1 gets nothing (its Host)
    rebound = get(served["url"] + "/v1/model", headers={"host": "attacker.example"})
    assert rebound.status == 403 and "localhost" in rebound.json()["error"]


def test_generate_json_png_and_seeds(served):
    url = served["url"] + "/v1/generate"
    resp = post(url, {"prompt": "red heart", "n": 3, "steps": 4, "seed": 10})
    assert resp.status == 200, resp.data
    body = resp.json()
    assert body["seeds"] == [10, 11, 12] and len(body["images"]) == 3
    assert [m["guidance"] for m in body["metadata"]] == [2.5] * 3  # no guidance asked: the model's own
    given = post(url, {"prompt": "red heart", "steps": 4, "guidance": 4}).json()
    assert given["metadata"][0]["guidance"] == 4.0
    images = [b64png(b) for b in body["images"]]
    assert all(im.size == (32, 32) for im in images)
    # image i of a request is the image of seed + i alone: batching never changes a result
    alone = post(url, {"prompt": "red heart", "n": 1, "steps": 4, "seed": 11}).json()
    assert_same_image(base64.b64decode(alone["images"][0]), base64.b64decode(body["images"][1]))

    raw = post(url, {"prompt": "red heart", "steps": 4, "seed": 10}, headers={"accept": "image/png"})
    assert raw.status == 200 and raw.headers["content-type"] == "image/png"
    assert png(raw.data).size == (32, 32) and raw.data == base64.b64decode(body["images"][0])
    fmt = post(url, {"prompt": "red heart", "steps": 4, "format": "png"})
    assert fmt.status == 200 and fmt.headers["content-type"] == "image/png"


def test_emoji_set_zip_shares_noise_and_carries_lineage(served):
    items = ["happy", "sad", "thinking"]
    resp = post(served["url"] + "/v1/emoji-sets", {"theme": "blob", "items": items, "seed": 7, "steps": 4})
    assert resp.status == 200 and resp.headers["content-type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(resp.data))
    names = zf.namelist()
    folder = names[0].split("/")[0]
    assert folder.startswith("set-") and all(n.startswith(folder + "/") for n in names)
    manifest = json.loads(zf.read(f"{folder}/manifest.json"))
    assert [it["prompt"] for it in manifest["items"]] == ["happy blob", "sad blob", "thinking blob"]
    assert {it["seed"] for it in manifest["items"]} == {7}
    assert manifest["model"]["dataset"] == "s3://data/emoji" and manifest["model"]["latent_table_version"] == 1
    assert manifest["settings"]["steps"] == 4 and manifest["settings"]["guidance"] == 2.5
    pngs = [png(zf.read(f"{folder}/{it['file']}")) for it in manifest["items"]]
    assert len(pngs) == 3 and all(p.size == (32, 32) for p in pngs)
    assert f"{folder}/sheet.png" in names
    # the set's items all start from the noise of seed 7: item 0 equals a lone generate of its prompt
    lone = post(served["url"] + "/v1/generate", {"prompt": "happy blob", "seed": 7, "steps": 4}).json()
    assert_same_image(base64.b64decode(lone["images"][0]), zf.read(f"{folder}/{manifest['items'][0]['file']}"))


def test_emoji_set_stored_in_s3_under_a_server_id(served):
    resp = post(served["url"] + "/v1/emoji-sets",
                {"theme": "cat", "items": ["smiling", "crying"], "steps": 3, "store": True})
    assert resp.status == 200, resp.data
    body = resp.json()
    assert body["uri"] == f"s3://sets/emoji/{body['id']}"
    keys = {o["Key"] for o in served["s3"].client().list_objects_v2(Bucket="sets")["Contents"]}
    prefix = f"emoji/{body['id']}/"
    assert {prefix + n for n in ("000-smiling.png", "001-crying.png", "sheet.png", "manifest.json")} <= keys
    # clients never choose where a set goes
    sneaky = post(served["url"] + "/v1/emoji-sets", {"theme": "cat", "items": ["x"], "store": True,
                                                    "uri": "s3://other/bucket"})
    assert sneaky.status == 422 and sneaky.json()["field"] == "uri"


BAD_GENERATE = [
    ({"prompt": "x", "n": 0}, 422, "n"),
    ({"prompt": "x", "n": 65}, 422, "n"),
    ({"prompt": "x", "steps": 0}, 422, "steps"),
    ({"prompt": "x", "guidance": -1}, 422, "guidance"),
    ({"prompt": "x", "scheduler": "euler"}, 422, "scheduler"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"n": 2}, 422, "prompt"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "n": 2, "format": "png"}, 422, "n"),
]


@pytest.mark.parametrize("body,status,field", BAD_GENERATE, ids=[str(b) for b, _, _ in BAD_GENERATE])
def test_bad_generate_requests_name_the_field(served, body, status, field):
    resp = post(served["url"] + "/v1/generate", body)
    assert resp.status == status
    error = resp.json()
    assert error["field"] == field and field in error["error"]


def test_bad_sets_body_size_and_json(served):
    url = served["url"]
    too_many = post(url + "/v1/emoji-sets", {"theme": "t", "items": ["a"] * 257})
    assert too_many.status == 422 and too_many.json()["field"] == "items"
    no_item = post(url + "/v1/emoji-sets", {"theme": "t", "items": ["a"], "template": "{theme} only"})
    assert no_item.status == 422 and no_item.json()["field"] == "template"
    empty = post(url + "/v1/emoji-sets", {"theme": "t", "items": []})
    assert empty.status == 422 and empty.json()["field"] == "items"
    huge = post(url + "/v1/generate", {"prompt": "a" * 300_000})
    assert huge.status == 413 and "larger than" in huge.json()["error"]
    malformed = post(url + "/v1/generate", b'{"prompt": "unterminated')
    assert malformed.status == 400 and "malformed JSON" in malformed.json()["error"]
    not_object = post(url + "/v1/generate", b"[1, 2]")
    assert not_object.status == 422
    assert get(url + "/v1/nothing-here").status == 404
    # the replica survived all of it
    assert post(url + "/v1/generate", {"prompt": "ok", "steps": 2}).status == 200


def test_concurrent_requests_share_pipeline_calls(served):
    """Four requests (the queue limit here) in flight at once, through the handle so they truly arrive
    together, share pipeline calls."""
    from ray import serve

    from emoji_ldm.inference.sampler import SampleJob

    handle = serve.get_deployment_handle("Generator", app_name="emoji")
    before = handle.stats.remote().result()
    responses = [handle.sample.remote(SampleJob((f"face {i}",), (i,), steps=10)) for i in range(4)]
    pngs = [r.result() for r in responses]
    after = handle.stats.remote().result()
    assert all(len(p) == 1 for p in pngs)
    requests, calls = after["requests"] - before["requests"], after["calls"] - before["calls"]
    assert requests == 4 and calls < requests, after


def test_overload_answers_503_json_and_recovers(served):
    """4 ongoing + 4 queued fit; the rest are refused at once with 503, not queued without bound."""
    def one(i):
        return post(served["url"] + "/v1/generate", {"prompt": f"slow {i}", "steps": 60, "n": 16, "seed": i})

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(one, range(24)))
    codes = [r.status for r in responses]
    assert 503 in codes and 200 in codes, codes
    refused = next(r for r in responses if r.status == 503)
    assert "capacity" in refused.json()["error"] and refused.headers.get("retry-after") == "5"
    assert post(served["url"] + "/v1/generate", {"prompt": "after", "steps": 2}).status == 200


def test_web_page_generates_and_downloads_zip_in_chromium(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = new_chrome(downloads)
    driver = browser.driver
    try:
        driver.get(served["url"] + "/")
        WebDriverWait(driver, 30).until(lambda d: "preset" in d.find_element(By.ID, "model").text)
        assert driver.find_element(By.ID, "guidance").get_attribute("value") == "2.5"  # the model's own
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("<img src=x onerror=alert(1)> red heart")  # text, never markup
        count = driver.find_element(By.ID, "count")
        count.clear()
        count.send_keys("3")
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("4")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure img")) == 3)
        captions = _texts(driver, "#gallery figcaption")
        assert all(c.startswith("<img src=x onerror=alert(1)> red heart") for c in captions)
        assert driver.find_elements(By.CSS_SELECTOR, "#gallery img[src='x']") == []
        sizes = driver.execute_script(
            "return [...document.querySelectorAll('#gallery img')].map(i => i.complete && i.naturalWidth)")
        assert sizes == [32, 32, 32]

        driver.find_element(By.ID, "download").click()
        zips = _wait_for_download(downloads)
        with zipfile.ZipFile(zips) as zf:
            names = zf.namelist()
            assert sorted(n for n in names if n.endswith(".png")) == [
                "000-seed-0.png", "001-seed-1.png", "002-seed-2.png"]
            assert json.loads(zf.read("generate.json"))["seeds"] == [0, 1, 2]
            assert all(png(zf.read(n)).size == (32, 32) for n in names if n.endswith(".png"))

        # emoji-set mode
        driver.find_element(By.ID, "tab-set").click()
        items = driver.find_element(By.ID, "items")
        items.clear()
        items.send_keys("happy\nsad")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60).until(  # the item and the alias people type (the theme is "blob")
            lambda d: _texts(d, "#gallery figcaption") == ["happy :happy_blob:", "sad :sad_blob:"])
        # for Slack (the page's default): 128 px RGBA PNGs, each shown on a light and on a dark background
        sizes = driver.execute_script(
            "return [...document.querySelectorAll('#gallery img')].map(i => i.naturalWidth)")
        assert sizes == [128, 128]
        darks = driver.execute_script("return [...document.querySelectorAll('#gallery .dark')].map("
                                      "d => getComputedStyle(d).backgroundColor)")
        assert darks == ["rgb(26, 29, 33)"] * 2

        # the same set drawn by the adapter the server loaded, picked from the page's menu
        def drawn(d):  # in one script: the page may redraw the gallery between two WebDriver calls
            return d.execute_script("return [...document.querySelectorAll('#gallery img')].map(i => i.src)")

        plain = drawn(driver)
        menu = Select(driver.find_element(By.ID, "adapter"))
        assert driver.find_element(By.ID, "adapter-label").is_displayed()
        assert [o.text for o in menu.options][1:] == ["my-cat (a sks cat emoji)"]
        menu.select_by_value("my-cat")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60).until(lambda d: len(drawn(d)) == 2 and drawn(d) != plain)
        menu.select_by_index(0)  # back to the base for what follows

        # a bad value shows the server's message, not a crash
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("0")
        driver.execute_script("document.getElementById('steps').removeAttribute('min')")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 30).until(lambda d: "steps" in d.find_element(By.ID, "status").text)
        assert "error" in driver.find_element(By.ID, "status").get_attribute("class")
    finally:
        browser.quit()


def _texts(driver, css: str) -> list[str]:
    """The shown text of every element CSS matches, read in one script (the page may redraw between two WebDriver
    calls, and an element read after that is stale)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.innerText)", css)


def _wait_for_download(folder, timeout: float = 30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [p for p in folder.iterdir() if p.suffix == ".zip"]
        if done:
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no zip downloaded into {folder}")


def test_a_set_drawn_by_an_adapter_chosen_per_request(served):
    """One base, one LoRA adapter: the request picks it by name; the base still draws without it."""
    card = get(served["url"] + "/v1/model").json()
    assert [a["name"] for a in card["adapters"]] == ["my-cat"]
    assert card["adapters"][0]["instance_prompt"] == "a sks cat emoji"
    body = {"theme": "sks cat", "items": ["happy", "sad", "party"], "format": "json", "steps": 2, "seed": 3}
    mine = post(served["url"] + "/v1/emoji-sets", {**body, "adapter": "my-cat"})
    assert mine.status == 200, mine.data
    base = post(served["url"] + "/v1/emoji-sets", body).json()
    mine = mine.json()
    assert mine["manifest"]["adapter"]["name"] == "my-cat" and mine["manifest"]["settings"]["adapter"] == "my-cat"
    assert mine["manifest"]["adapter"]["content_id"].startswith("sha256:")
    assert len(mine["images"]) == 3 and mine["images"] != base["images"]  # the adapter changes the drawings
    assert b64png(mine["images"][0]).text["adapter"] == "my-cat"  # and the PNGs say which adapter drew them
    again = post(served["url"] + "/v1/emoji-sets", body).json()
    assert again["images"] == base["images"]  # the base is unchanged after an adapter request

    unknown = post(served["url"] + "/v1/generate", {"prompt": "a sks cat emoji", "adapter": "your-dog"})
    assert unknown.status == 404
    assert unknown.json()["field"] == "adapter" and "your-dog" in unknown.json()["error"]
    assert "my-cat" in unknown.json()["error"]

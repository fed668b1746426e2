"""POST /generate with n images, neighbour pictures and several databases (real server, tiny model)."""

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving import ServerThread, build_tiny_pipeline, metric_value

from imageragturbo.model.images import tensor_to_images
from imageragturbo.service import ServiceSettings, create_app

JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return build_tiny_pipeline(tiny_model_dir, databases=("grey", "dim", "bright"))


@pytest.fixture(scope="module")
def server(pipe):
    with ServerThread(create_app(pipe, ServiceSettings(max_batch=4, batch_wait_ms=0), model_name="tiny")) as running:
        yield running


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_n_1_answers_are_the_answers_without_n(server):
    body = {"prompt": "a red circle", "seed": 5, "k": 3}
    plain, one = (httpx.post(f"{server.url}/generate", json=b) for b in (body, {**body, "n": 1}))
    assert plain.content == one.content and plain.headers["content-type"] == one.headers["content-type"] == "image/png"
    assert plain.headers["x-seed"] == one.headers["x-seed"] == "5"
    plain_json, one_json = (httpx.post(f"{server.url}/generate", json=b, headers=JSON).json() for b in (body, {**body, "n": 1}))
    assert list(plain_json) == list(one_json) == ["image", "seed", "mode", "timings_ms", "neighbors"]
    assert {k: v for k, v in plain_json.items() if k != "timings_ms"} == {k: v for k, v in one_json.items() if k != "timings_ms"}


def test_n_images_come_from_one_call_with_consecutive_seeds_as_a_json_list(server, pipe):
    before = metric_value(server.url, "irt_batch_size_count")
    response = httpx.post(f"{server.url}/generate", json={"prompt": "two blue squares", "seed": 100, "n": 6, "k": 2})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert metric_value(server.url, "irt_batch_size_count") == before + 1  # 6 > max_batch 4, still one pipeline call
    body = response.json()
    assert list(body) == ["images", "mode", "timings_ms"] and body["mode"] == "adapter"
    assert [item["seed"] for item in body["images"]] == list(range(100, 106))
    assert response.headers["x-seed"] == ",".join(map(str, range(100, 106)))
    for item in body["images"]:
        alone = pipe(["two blue squares"], [item["seed"]], mode="adapter", k=2).images[0]
        assert np.array_equal(_png(base64.b64decode(item["image"])), alone)
        assert [n["caption"] for n in item["neighbors"]][0] == "two blue squares" and len(item["neighbors"]) == 2
    random_seeds = httpx.post(f"{server.url}/generate", json={"prompt": "a", "n": 3, "mode": "off"}).json()
    assert len({item["seed"] for item in random_seeds["images"]}) == 3


def test_neighbor_images_are_the_stored_latents_decoded_by_the_vae(server, pipe):
    response = httpx.post(f"{server.url}/generate", json={"prompt": "three red circles", "seed": 1, "k": 3,
                                                          "database": "dim", "neighbor_images": True}, headers=JSON)
    neighbors = response.json()["neighbors"]
    assert len(neighbors) == 3 and all(set(n) == {"id", "caption", "score", "image"} for n in neighbors)
    store = pipe.databases["dim"].store
    rows = [int(n["id"].removeprefix("dim-")) for n in neighbors]
    with torch.inference_mode():
        expected = tensor_to_images(pipe.vae_decode(torch.from_numpy(store.latents(np.asarray(rows)).astype(np.float32))))
    for n, want in zip(neighbors, expected):
        assert np.array_equal(_png(base64.b64decode(n["image"])), want)
    without = httpx.post(f"{server.url}/generate", json={"prompt": "three red circles", "seed": 1}, headers=JSON).json()
    assert all("image" not in n for n in without["neighbors"])
    off = httpx.post(f"{server.url}/generate", json={"prompt": "a", "mode": "off", "neighbor_images": True}, headers=JSON)
    assert off.status_code == 200 and off.json()["neighbors"] == []


def test_requests_pick_a_database_and_the_first_is_the_default(server, pipe):
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["databases"] == {"grey": 6, "dim": 6, "bright": 6} and ready["default_database"] == "grey"
    info = httpx.get(f"{server.url}/info").json()
    assert [(d["name"], d["default"]) for d in info["databases"]] == [("grey", True), ("dim", False), ("bright", False)]
    for database in ("grey", "dim", "bright"):
        response = httpx.post(f"{server.url}/generate", json={"prompt": "a red circle", "seed": 2, "database": database},
                              headers=JSON).json()
        expected = pipe(["a red circle"], [2], mode="adapter", k=4, database=database)
        assert [n["id"] for n in response["neighbors"]] == [n.id for n in expected.neighbors[0]]
    default = httpx.post(f"{server.url}/generate", json={"prompt": "a red circle", "seed": 2}, headers=JSON).json()
    assert default["neighbors"][0]["id"] == "0"  # grey's rows are named 0..5


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "a", "n": 0}, "n: Input should be greater than or equal to 1"),
        ({"prompt": "a", "n": 11}, "n: Input should be less than or equal to 10"),
        ({"prompt": "a", "n": "2"}, "n: Input should be a valid integer"),
        ({"prompt": "a", "n": 2, "seed": 2**63 - 1}, "seed + n - 1 must be at most 9223372036854775807"),
        ({"prompt": "a", "neighbor_images": "yes"}, "neighbor_images: Input should be a valid boolean"),
    ],
)
def test_bad_n_is_refused(server, body, message):
    response = httpx.post(f"{server.url}/generate", json=body)
    assert response.status_code == 422 and message in response.json()["detail"]

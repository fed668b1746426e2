"""POST /v1/images/generations and GET /v1/models with the official `openai` client against the
real uvicorn server on loopback (tiny model, and the bundled model where it is there)."""

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from serving import ServerThread, build_tiny_pipeline, bundled_model, metric_value

from imageragturbo.service import ServiceSettings, create_app

BUNDLED = bundled_model()


@pytest.fixture(scope="module")
def two_db_pipe(tiny_model_dir):
    return build_tiny_pipeline(tiny_model_dir, databases=("grey", "dim"))


@pytest.fixture(scope="module")
def server(two_db_pipe):
    settings = ServiceSettings(max_batch=4, batch_wait_ms=0, timeout_s=30)
    with ServerThread(create_app(two_db_pipe, settings, model_name="tiny")) as running:
        yield running


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _png(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_official_client_gets_n_pngs_of_the_models_size_from_one_pipeline_call(client, server, two_db_pipe):
    batches_before = metric_value(server.url, "irt_batch_size_count")
    answer = client.images.generate(model="tiny", prompt="a red circle", n=4, response_format="b64_json")
    assert len(answer.data) == 4 and answer.created > 0
    images = [_png(item.b64_json) for item in answer.data]
    assert all(image.shape == (16, 16, 3) for image in images)
    assert metric_value(server.url, "irt_batch_size_count") == batches_before + 1  # the 4 images were one pipeline call
    assert answer.size == "16x16" and answer.output_format == "png"
    extra = answer.model_extra
    assert extra["model"] == "tiny" and extra["mode"] == "adapter"
    assert extra["database"] == "grey" and extra["warnings"] == []
    seeds = [item.model_extra["seed"] for item in answer.data]
    assert all(0 <= seed < 2**63 for seed in seeds)
    expected = two_db_pipe(["a red circle"] * 4, seeds, mode="adapter", k=4, database="grey").images
    for image, want in zip(images, expected):
        assert np.array_equal(image, want)
    neighbors = answer.data[0].model_extra["neighbors"]
    assert len(neighbors) == 4 and set(neighbors[0]) == {"id", "caption", "score"}


def test_seed_extension_gives_consecutive_seeds_and_the_same_pixels_as_generate(client, server):
    answer = client.images.generate(
        model="tiny", prompt="two blue squares", n=3, response_format="b64_json", size="16x16", user="alice",
        extra_body={"seed": 41, "mode": "inject", "inject_w": 0.6, "database": "dim"},
    )
    assert [item.model_extra["seed"] for item in answer.data] == [41, 42, 43]
    assert answer.model_extra["database"] == "dim" and answer.model_extra["mode"] == "inject"
    for item in answer.data:
        body = {"prompt": "two blue squares", "seed": item.model_extra["seed"], "mode": "inject", "inject_w": 0.6, "database": "dim"}
        png = httpx.post(f"{server.url}/generate", json=body)
        assert png.status_code == 200
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")), _png(item.b64_json))
        assert len(item.model_extra["neighbors"]) == 1  # inject: the top-1 neighbour


def test_models_list_names_the_size_modes_databases_and_default(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    model = models.data[0].model_extra
    assert model["size"] == "16x16" and model["max_n"] == 10
    assert model["modes"] == ["adapter", "inject", "off"] and model["default_mode"] == "adapter"
    assert model["databases"] == [
        {"name": "grey", "size": 6, "searcher": "exact", "default": True},
        {"name": "dim", "size": 6, "searcher": "exact", "default": False},
    ]
    assert model["default_database"] == "grey"
    assert model["device"] == "cpu" and model["dtype"] == "float32" and model["engine"] == "torch"
    # The tiny model's CLIP BPE has no word vocabulary to list.
    assert model["tokenizer"] == "BPE" and model["vocabulary"] is None
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(f"{server.url}/info").json() == {**model, "id": "tiny", "object": "model",
                                                       "created": models.data[0].created, "owned_by": "imageragturbo"}


@pytest.mark.parametrize(
    ("kwargs", "error", "param", "message"),
    [
        ({"size": "1024x1024"}, openai.UnprocessableEntityError, "size",
         "size '1024x1024' is not supported: this model makes 16x16 images only"),
        ({"response_format": "url"}, openai.UnprocessableEntityError, "response_format",
         "response_format 'url' needs image storage, and none is configured"),
        ({"n": 11}, openai.UnprocessableEntityError, "n", "n: Input should be less than or equal to 10"),
        ({"n": 0}, openai.UnprocessableEntityError, "n", "n: Input should be greater than or equal to 1"),
        ({"model": "dall-e-3"}, openai.NotFoundError, "model", "model 'dall-e-3' is not served here; this server serves 'tiny'"),
        ({"quality": "hd"}, openai.UnprocessableEntityError, "quality", "quality: unknown field (allowed: prompt, seed"),
        ({"extra_body": {"database": "sepia"}}, openai.NotFoundError, "database", "unknown database 'sepia'; configured databases: grey, dim"),
        ({"extra_body": {"seed": 2**63 - 2}, "n": 3}, openai.UnprocessableEntityError, None, "seed + n - 1 must be at most"),
    ],
    ids=["size", "url", "n-11", "n-0", "model", "unknown-field", "database", "seed-overflow"],
)
def test_refusals_are_openai_shaped_and_name_the_field(client, kwargs, error, param, message):
    with pytest.raises(error) as caught:
        client.images.generate(prompt="a red circle", **kwargs)
    body = caught.value.response.json()
    assert message in body["error"]["message"], body
    assert body["error"]["param"] == param and body["error"]["type"]
    assert body["request_id"] == caught.value.response.headers["x-request-id"]


def test_api_key_guards_the_v1_routes(tiny_pipe):
    with ServerThread(create_app(tiny_pipe, ServiceSettings(api_key="k3y"), model_name="tiny")) as running:
        with openai.OpenAI(base_url=f"{running.url}/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.images.generate(prompt="a red circle")
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=f"{running.url}/v1", api_key="k3y", max_retries=0) as good:
            assert len(good.images.generate(prompt="a red circle", n=2).data) == 2
        assert httpx.get(f"{running.url}/info").status_code == 200  # the playground's, open like /readyz


@pytest.mark.slow
@pytest.mark.skipif(BUNDLED is None, reason="the bundled model is not there")
def test_bundled_model_through_the_official_client():
    from imageragturbo.retrieval.disk import model_databases
    from imageragturbo.model.pipeline import open_pipeline

    pipe = open_pipeline(BUNDLED)  # with the model's own databases, the default first
    databases = [spec.split("=")[0] for spec in model_databases(BUNDLED)]
    with ServerThread(create_app(pipe, ServiceSettings(), model_name=BUNDLED.name)) as running:
        with openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            info = client.models.list().data[0].model_extra
            assert info["size"] == "32x32" and info["tokenizer"] == "WordLevel"
            assert {"red", "circle", "left", "square", "right", "and"} <= set(info["vocabulary"])
            assert "<|unk|>" not in info["vocabulary"] and info["unk_token"] == "<|unk|>"
            assert [d["name"] for d in info["databases"]] == databases and info["default_database"] == databases[0]
            if (BUNDLED / "databases").is_dir():  # v2: a database per background style, grey the default
                assert set(databases) == {"dim", "grey", "bright"} and info["default_database"] == "grey"
            answer = client.images.generate(
                model=BUNDLED.name, prompt="a red circle on the left and a blue square on the right", n=4,
                response_format="b64_json",
            )
            assert [_png(item.b64_json).shape for item in answer.data] == [(32, 32, 3)] * 4
            assert answer.model_extra["warnings"] == [] and answer.model_extra["database"] == databases[0]
            for database in databases:
                picked = client.images.generate(model=BUNDLED.name, prompt="two blue squares", extra_body={"database": database})
                assert picked.model_extra["database"] == database
            odd = client.images.generate(model=BUNDLED.name, prompt="a gigantic red circle, please", n=1)
            assert odd.model_extra["warnings"] == [
                'words outside the model\'s vocabulary (the model reads <|unk|> for each): "gigantic", ",", "please"'
            ]

"""The bundled model (models/shapes-v2) does what its model card says, through the HTTP API."""

import pytest
from serving import ServerThread

from imageragturbo.eval.style_http import measure_style
from imageragturbo.paths import bundled_model_if_present

BUNDLED = bundled_model_if_present()
pytestmark = pytest.mark.skipif(BUNDLED is None, reason="the bundled model is not in this checkout")


@pytest.fixture(scope="module")
def server():
    from imageragturbo.model.pipeline import open_pipeline
    from imageragturbo.service import ServiceSettings, create_app

    pipe = open_pipeline(BUNDLED)
    with ServerThread(create_app(pipe, ServiceSettings(max_batch=8, timeout_s=60), model_name=BUNDLED.name)) as running:
        yield running


def test_serves_one_database_per_style_grey_the_default():
    from imageragturbo.retrieval.disk import model_databases

    assert [spec.split("=")[0] for spec in model_databases(BUNDLED)] == ["grey", "bright", "dim"]


def test_the_background_follows_the_requested_database_in_mode_adapter_only(server):
    # The target: >= 0.8 on average over the three databases for adapter, <= 0.45 for off.
    shares = measure_style(server.url, n=20)
    assert shares["adapter"]["mean"] >= 0.8, shares
    assert shares["off"]["mean"] <= 0.45, shares

"""The playground page in a real headless Chromium, driven over the DevTools protocol."""

import io
from contextlib import contextmanager

import numpy as np
import pytest
from chromium_cdp import Chromium, Page
from PIL import Image
from serving import CAPTIONS, ServerThread, build_tiny_pipeline, word_level_tokenizer

from imageragturbo.service import ServiceSettings, create_app


@contextmanager
def _playground(chromium, pipe, model_name, tmp_path):
    """The playground of a real server on ``pipe``, open in headless Chromium once it has loaded."""
    with ServerThread(create_app(pipe, ServiceSettings(), model_name=model_name)) as server:
        browser = Chromium(chromium, tmp_path / "profile")
        try:
            page = Page(browser, f"{server.url}/")
            page.wait_for(f"document.getElementById('status').textContent.includes('model {model_name}')")
            yield page
        finally:
            browser.close()


def _shown_pixels(page, shape) -> np.ndarray:
    """The #image's pixels as the page decoded them, uint8 [H, W, 3]."""
    pixels = page.eval(
        "(() => { const img = document.getElementById('image'); const c = document.createElement('canvas');"
        " c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d');"
        " g.drawImage(img, 0, 0); return Array.from(g.getImageData(0, 0, c.width, c.height).data); })()"
    )
    return np.asarray(pixels, dtype=np.uint8).reshape(shape[0], shape[1], 4)[..., :3]


@pytest.mark.slow
def test_playground_generates_and_shows_image_timings_and_neighbours(chromium, tiny_pipe, tmp_path):
    with _playground(chromium, tiny_pipe, "tiny", tmp_path) as page:
        assert page.eval("document.querySelector('#mode option[value=\"\"]').textContent") == "default (adapter)"

        page.type_into("#prompt", "two blue squares")
        page.type_into("#seed", "7")
        page.eval("document.getElementById('steps').value = '2'")
        page.click("#go")
        page.wait_for("document.getElementById('status').textContent.startsWith('mode adapter')")
        assert page.eval("document.getElementById('status').textContent") == "mode adapter · seed 7"

        # The image: the pipeline's own pixels, shown 24x larger with nearest-neighbour scaling.
        expected = tiny_pipe(["two blue squares"], [7], mode="adapter", steps=2).images[0]
        natural = page.eval("[document.getElementById('image').naturalWidth, document.getElementById('image').naturalHeight]")
        assert natural == [expected.shape[1], expected.shape[0]]
        shown = page.eval("(() => { const r = document.getElementById('image').getBoundingClientRect(); return [r.width, r.height]; })()")
        assert shown == [384 + 2, 384 + 2]  # plus the 1 px border
        assert page.eval("getComputedStyle(document.getElementById('image')).imageRendering") == "pixelated"
        rgb = _shown_pixels(page, expected.shape)
        assert np.array_equal(rgb, expected)

        stages = page.eval("Array.from(document.querySelectorAll('#timings tr')).map(r => r.cells[0].textContent)")
        assert stages == ["queue_wait", "text_encode", "retrieve", "denoise", "vae_decode", "postprocess", "total"]
        assert page.eval("document.querySelectorAll('#timings td.ms')[3].textContent").endswith(" ms")
        captions = page.eval("Array.from(document.querySelectorAll('#neighbors li')).map(li => li.firstChild.textContent.trim())")
        expected_neighbors = tiny_pipe(["two blue squares"], [7], mode="adapter", k=4).neighbors[0]
        assert captions == [n.caption for n in expected_neighbors]
        assert captions[0] == "two blue squares"

        page.screenshot(tmp_path / "playground.png")
        assert Image.open(io.BytesIO((tmp_path / "playground.png").read_bytes())).size[0] > 400

        # Mode off: no neighbours, and the page says so.
        page.eval("document.getElementById('mode').value = 'off'")
        page.click("#go")
        page.wait_for("document.getElementById('status').textContent.startsWith('mode off')")
        assert page.eval("document.getElementById('neighbors').textContent") == "none (mode off)"


@pytest.mark.slow
def test_playground_database_k_w_controls_neighbour_pictures_and_unknown_words(chromium, tiny_model_dir, tmp_path):
    words = sorted({word for caption in CAPTIONS for word in caption.split()})
    pipe = build_tiny_pipeline(tiny_model_dir, databases=("grey", "dim"), tokenizer=word_level_tokenizer(words))
    with _playground(chromium, pipe, "words", tmp_path) as page:
        # Before the first image: a placeholder, and no <img> shown without a picture in it.
        assert page.eval("getComputedStyle(document.getElementById('image')).display") == "none"
        assert page.eval("getComputedStyle(document.getElementById('placeholder')).display") != "none"
        assert page.eval("Array.from(document.images).filter(i => i.offsetParent !== null).length") == 0
        placeholder = page.eval("document.getElementById('prompt').placeholder")
        assert placeholder == "a red circle on the left and a blue square on the right"
        assert page.eval("document.getElementById('database').options[0].textContent") == "default (grey)"
        assert page.eval("Array.from(document.getElementById('database').options).map(o => o.value)") == ["", "grey", "dim"]
        assert page.eval("document.getElementById('k').max") == "6"

        # Unknown words are flagged while typing, from the vocabulary GET /info lists.
        page.type_into("#prompt", "a gigantic red circle")
        page.wait_for("document.getElementById('prompt-warning').textContent.includes('gigantic')")
        assert page.eval("document.getElementById('prompt').classList.contains('unknown')")
        page.type_into("#prompt", "Two blue squares")
        page.wait_for("document.getElementById('prompt-warning').textContent === ''")

        page.eval("document.getElementById('database').value = 'dim'")
        page.eval("document.getElementById('mode').value = 'inject'")
        page.type_into("#k", "2")
        page.type_into("#w", "0.5")
        page.type_into("#seed", "11")
        page.click("#go")
        page.wait_for("document.getElementById('status').textContent.startsWith('mode inject')")
        expected = pipe(["Two blue squares"], [11], mode="inject", inject_w=0.5, database="dim")
        image = expected.images[0]
        rgb = _shown_pixels(page, image.shape)
        assert np.array_equal(rgb, image)
        assert page.eval("getComputedStyle(document.getElementById('placeholder')).display") == "none"
        # The neighbour (inject: the top-1) with its picture, decoded from its stored latent.
        ids = page.eval("Array.from(document.querySelectorAll('#neighbors li .score')).map(s => s.textContent)")
        assert ids == [f"({expected.neighbors[0][0].id}, score {expected.neighbors[0][0].score:.3f})"]
        assert ids[0].startswith("(dim-")
        thumbs = page.eval("Array.from(document.querySelectorAll('#neighbors img.thumb')).map(i => [i.naturalWidth, i.complete])")
        assert thumbs == [[image.shape[1], True]]

        # The server's warnings are shown too.
        page.type_into("#prompt", "a red circle wow")
        page.click("#go")
        page.wait_for("!document.getElementById('warnings').hidden")
        assert '"wow"' in page.eval("document.getElementById('warnings').textContent")
        page.screenshot(tmp_path / "playground-controls.png")

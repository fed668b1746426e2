"""The playground page in a real headless Chromium, driven over the DevTools protocol."""

import io

import numpy as np
import pytest
from chromium_cdp import Chromium, Page
from PIL import Image
from serving import ServerThread

from imageragturbo.service import ServiceSettings, create_app


@pytest.mark.slow
def test_playground_generates_and_shows_image_timings_and_neighbours(chromium, tiny_pipe, tmp_path):
    with ServerThread(create_app(tiny_pipe, ServiceSettings(), model_name="tiny")) as server:
        browser = Chromium(chromium, tmp_path / "profile")
        try:
            page = Page(browser, f"{server.url}/")
            page.wait_for("document.getElementById('status').textContent.includes('model tiny')")
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
            pixels = page.eval(
                "(() => { const img = document.getElementById('image'); const c = document.createElement('canvas');"
                " c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d');"
                " g.drawImage(img, 0, 0); return Array.from(g.getImageData(0, 0, c.width, c.height).data); })()"
            )
            rgb = np.asarray(pixels, dtype=np.uint8).reshape(expected.shape[0], expected.shape[1], 4)[..., :3]
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
        finally:
            browser.close()

"""The style check through the HTTP API: does the background band follow the requested database?

For each (mode, database), ``POST /generate`` the fixed test-seen prompts with their seeds and
read each PNG's style (``world.style.read_style``); the share that is the database's own style
is the number the issue's target is stated in (mode ``adapter`` >= 0.8 on average over the
three databases, mode ``off`` <= 0.45). Run against any server: ``measure_style(url, ...)``.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image

from imageragturbo.world.render import STYLE_NAMES
from imageragturbo.world.splits import eval_prompts
from imageragturbo.world.style import read_style


def measure_style(url: str, *, n: int = 30, modes: tuple[str, ...] = ("adapter", "off"),
                  databases: tuple[str, ...] = STYLE_NAMES, timeout_s: float = 60.0) -> dict[str, dict[str, float]]:
    """{mode: {database: share of PNGs in that database's style, "mean": their mean}}."""
    prompts = eval_prompts("test-seen", n)
    out: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for mode in modes:
            shares = {}
            for database in databases:
                hits = []
                for caption, seed in prompts:
                    response = client.post("/generate", json={"prompt": caption, "seed": seed, "mode": mode, "database": database})
                    response.raise_for_status()
                    image = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
                    hits.append(read_style(image) == database)
                shares[database] = float(np.mean(hits))
            shares["mean"] = float(np.mean(list(shares.values())))
            out[mode] = shares
    return out

"""Wire formats of POST /generate. Unknown fields are refused, never ignored."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator

MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**63 - 1
MAX_K = 16

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS)]


class GenerateRequest(BaseModel):
    """One image. Numbers are strict JSON numbers: ``"3"`` and ``true`` are not integers here."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt = Field(description=f"1 to {MAX_PROMPT_CHARS} characters after trimming whitespace")
    seed: StrictInt | None = Field(
        None, ge=0, le=MAX_SEED, description="noise seed; a random one is drawn (and echoed) when absent"
    )
    steps: StrictInt = Field(1, ge=1, le=4, description="UNet passes (the paper's few-step schedule)")
    mode: Literal["adapter", "inject", "off"] | None = Field(
        None,
        description=(
            "adapter: retrieval through the trained H-space adapter; inject: training-free slerp "
            "injection of the top-1 neighbour; off: no retrieval. All three run the one-step UNet "
            "with the decoder LoRA that trained beside the adapter, when the model has one. "
            "Default: adapter when the model has an adapter and a database is loaded, else off "
            "(the answer says which ran)"
        ),
    )
    inject_w: float = Field(
        0.8, gt=0, le=1, allow_inf_nan=False, description="injection blend w, 0 < w <= 1 (mode inject)"
    )
    k: StrictInt = Field(4, ge=1, le=MAX_K, description="neighbours to retrieve (at most the database size)")
    database: str | None = Field(
        None, max_length=128, description="a configured database name (default: the first configured one)"
    )

    @field_validator("inject_w")
    @classmethod
    def _positive_in_float32(cls, w: float) -> float:
        # The model blends in float32: a positive double below float32's smallest subnormal
        # would become a zero weight there.
        if not np.float32(w) > 0:
            raise ValueError(f"inject_w must be at least {float(np.finfo(np.float32).smallest_subnormal):.1e} (float32), got {w!r}")
        return w


class NeighborOut(BaseModel):
    id: str
    caption: str
    score: float


class GenerateResponse(BaseModel):
    """The JSON answer (``Accept: application/json``); otherwise the body is the PNG itself."""

    image: str = Field(description="base64-encoded PNG")
    seed: int
    mode: str
    timings_ms: dict[str, float] = Field(description="queue_wait and the pipeline stages, milliseconds")
    neighbors: list[NeighborOut]


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, in one sentence")

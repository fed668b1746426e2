"""Wire formats of POST /generate and of the OpenAI-shaped POST /v1/images/generations and
GET /v1/models. Unknown fields are refused, never ignored.

Numbers are JSON numbers and nothing else: ``"3"`` and ``true`` are refused everywhere. An
integer field takes what JSON Schema calls an integer, so ``3.0`` is 3 and ``3.5`` is refused.
A prompt is 1 to MAX_PROMPT_CHARS characters as sent, at least one of them not whitespace; the
whitespace around it is trimmed before the model reads it.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**63 - 1
MAX_K = 16
MAX_N = 10
FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)
VISIBLE = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
"""The prompt's pattern in the OpenAPI document: a character that is not whitespace as
``str.strip`` (the check below) sees it. Spelled out: ``\\S`` means other characters in
ECMA-262 regexes (JSON Schema's), in Python's and in pydantic's (U+001E, U+0085, U+FEFF)."""


def _trimmed_visible(prompt: str) -> str:
    trimmed = prompt.strip()
    if not trimmed:
        raise PydanticCustomError(
            "string_too_short", "String should have at least 1 character that is not whitespace (no visible character)"
        )
    return trimmed


def _json_integer(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(value, float):
        if not value.is_integer():  # also NaN and infinities
            raise PydanticCustomError("int_from_float", "Input should be a valid integer, got a number with a fractional part")
        return int(value)
    return value


def _json_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    try:
        return float(value)
    except OverflowError:  # an integer beyond any double
        return math.inf


Prompt = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PROMPT_CHARS, json_schema_extra={"pattern": VISIBLE}),
    AfterValidator(_trimmed_visible),
]
JsonInt = Annotated[int, BeforeValidator(_json_integer)]
JsonNumber = Annotated[float, BeforeValidator(_json_number)]


class GenerateRequest(BaseModel):
    """Images of one prompt (the module's docstring says how numbers and prompts are read)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt = Field(
        description=f"1 to {MAX_PROMPT_CHARS} characters, at least one not whitespace (the model reads it trimmed)"
    )
    # The bounds go before the validator: after it, pydantic's JSON schema writes them as "ge"/"le".
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_json_integer)] | None = Field(
        None,
        description="noise seed of the first image (image i gets seed + i); random seeds are drawn (and echoed) "
        "when absent",
    )
    steps: JsonInt = Field(1, ge=1, le=4, description="UNet passes (the paper's few-step schedule)")
    start_t: Annotated[int, Field(ge=1, le=998), BeforeValidator(_json_integer)] | None = Field(
        None,
        description="beyond the paper: start from the top-1 neighbour's latent noised to this timestep (of "
        "the model's 1000) instead of from pure noise, then take `steps` steps from there: retrieval as "
        "img2img, in any mode; needs a database. Lower keeps more of the neighbour. Default: from noise",
    )
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
    inject_w: JsonNumber = Field(
        0.8,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="injection blend w, 0 < w <= 1 (mode inject); the model blends in float32, where a w below "
        f"{FLOAT32_TINY:.1e} counts as {FLOAT32_TINY:.1e}",
    )
    k: JsonInt = Field(
        4,
        ge=1,
        le=MAX_K,
        description="neighbours to retrieve, at most the database's rows whatever the mode (the default, 4, "
        "shrinks to a smaller database's size)",
    )
    database: str | None = Field(
        None, max_length=128, description="a configured database name (default: the model's default database)"
    )
    n: JsonInt = Field(
        1, ge=1, le=MAX_N, description=f"images of this prompt, 1 to {MAX_N}, made in one pipeline call"
    )
    neighbor_images: StrictBool = Field(
        False,
        description="also return each neighbour's picture (its stored latent decoded by the model's VAE) as "
        "neighbors[].image, a base64 PNG",
    )

    @field_validator("inject_w")
    @classmethod
    def _positive_in_float32(cls, w: float) -> float:
        # Every w > 0 is accepted (the document's exclusiveMinimum 0); one that float32 would
        # round to zero blends as the smallest float32 instead.
        return max(w, FLOAT32_TINY)

    @model_validator(mode="after")
    def _seeds_fit(self):
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise ValueError(f"seed + n - 1 must be at most {MAX_SEED} (image i gets seed + i)")
        return self


class ImagesGenerationRequest(GenerateRequest):
    """OpenAI's images.generate body; ``seed``, ``steps``, ``mode``, ``inject_w``, ``k``,
    ``database`` and ``neighbor_images`` are this server's extensions (send them with the
    client's ``extra_body``)."""

    model: str | None = Field(None, max_length=256, description="the served model's id (GET /v1/models); default: it")
    size: str | None = Field(
        None, max_length=32, description="WIDTHxHEIGHT; only the model's native size (GET /v1/models), or 'auto'"
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (the default); url needs image storage, which this server does not have"
    )
    user: str | None = Field(
        None, max_length=256, description="an end-user id; the access log keeps only a hash of it"
    )


class NeighborOut(BaseModel):
    id: str
    caption: str
    score: float
    image: str | None = Field(None, description="base64 PNG of the neighbour (only with neighbor_images)")


class GenerateResponse(BaseModel):
    """The JSON answer (``Accept: application/json``) for one image; otherwise the body is the
    PNG itself."""

    image: str = Field(description="base64-encoded PNG")
    seed: int
    mode: str
    timings_ms: dict[str, float] = Field(description="queue_wait and the pipeline stages, milliseconds")
    neighbors: list[NeighborOut]
    warnings: list[str] | None = Field(
        None, description="present when the prompt has words outside the model's vocabulary (or was cut off)"
    )


class GeneratedImage(BaseModel):
    image: str = Field(description="base64-encoded PNG")
    seed: int
    neighbors: list[NeighborOut]


class GenerateListResponse(BaseModel):
    """The answer for n > 1 (always JSON): one entry per image, seeds seed, seed + 1, ..."""

    images: list[GeneratedImage]
    mode: str
    timings_ms: dict[str, float] = Field(description="queue_wait and the pipeline stages of the one batch, ms")
    warnings: list[str] | None = None


class OpenAIImage(BaseModel):
    b64_json: str = Field(description="base64-encoded PNG")
    seed: int
    neighbors: list[NeighborOut]


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time, seconds")
    data: list[OpenAIImage]
    model: str
    size: str
    output_format: str = "png"
    mode: str
    database: str | None
    warnings: list[str]
    timings_ms: dict[str, float]


class DatabaseOut(BaseModel):
    name: str
    size: int = Field(description="rows")
    searcher: str
    default: bool


class ModelOut(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    size: str = Field(description="the native image size, WIDTHxHEIGHT: the only one served")
    max_n: int
    engine: str
    device: str
    dtype: str
    modes: list[str]
    default_mode: str
    databases: list[DatabaseOut]
    default_database: str | None
    tokenizer: str = Field(description="the tokenizer's model kind (WordLevel, BPE, ...)")
    max_tokens: int = Field(description="tokens the text encoder reads; the rest of a prompt is cut off")
    unk_token: str | None
    vocabulary: list[str] | None = Field(description="the words a word-level tokenizer knows; null for subwords")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelOut]


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, in one sentence")
    request_id: str = Field(description="this request's X-Request-ID")


class FieldError(BaseModel):
    field: str = Field(description="the field at fault, dotted ('body': the body as a whole)")
    message: str
    type: str = Field(description="the kind of problem (missing, string_too_long, int_type, ...)")


class ValidationErrorResponse(ErrorResponse):
    """A 422: ``detail`` joins the problems into one sentence; ``errors`` lists them."""

    errors: list[FieldError]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail
    request_id: str

"""Proactive content negotiation (RFC 9110, section 12.5.1): which of a route's media types
the ``Accept`` header asks for.

Each offer gets the quality of the most specific media range that matches it (``image/png``
over ``image/*`` over ``*/*``); ``q=0`` means "not acceptable". The offer with the highest
quality wins; on a tie, the one matched by the more specific range (so ``application/json,
*/*`` means JSON), then the route's own order. No acceptable offer: 406. No Accept header, or
one with no parsable media range, accepts anything.
"""

from __future__ import annotations

import re

from imageragturbo.service.generation import ApiError

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
MEDIA_RANGE = re.compile(rf"\s*({_TOKEN})/({_TOKEN})\s*((?:;[^;]*)*)$")
QUALITY = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def parse_accept(header: str) -> list[tuple[str, str, float]]:
    """``(type, subtype, q)`` per media range; malformed ranges are left out."""
    ranges = []
    for part in header.split(","):
        match = MEDIA_RANGE.match(part)
        if not match:
            continue
        kind, subtype, params = match.group(1).lower(), match.group(2).lower(), match.group(3)
        if kind == "*" and subtype != "*":
            continue
        q = 1.0
        for param in params.split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                if not QUALITY.fullmatch(value):
                    break  # a malformed weight: the whole range is left out
                q = float(value)
        else:
            ranges.append((kind, subtype, q))
    return ranges


def choose(accept: str | None, offers: tuple[str, ...]) -> str | None:
    """The offer to answer with, or None when the header accepts none of them."""
    ranges = parse_accept(accept) if accept else []
    if not ranges:
        return offers[0]
    best, best_key = None, (0.0, -1)
    for order, offer in enumerate(offers):
        kind, subtype = offer.split("/")
        matches = [
            (2 if (k, s) == (kind, subtype) else 1 if (k, s) == (kind, "*") else 0, q)
            for k, s, q in ranges
            if (k, s) in ((kind, subtype), (kind, "*"), ("*", "*"))
        ]
        if not matches:
            continue
        specificity, q = max(matches)  # the most specific range decides the offer's quality
        key = (q, specificity)
        if q > 0 and key > best_key:
            best, best_key = offer, key
    return best


def negotiate(accept: str | None, offers: tuple[str, ...]) -> str:
    """:func:`choose`, raising 406 (naming what this route can send) when nothing is acceptable."""
    chosen = choose(accept, offers)
    if chosen is None:
        raise ApiError(
            406,
            f"the Accept header allows none of the media types this answer can have: {', '.join(offers)}",
            code="not_acceptable",
        )
    return chosen

"""The shape check on raw JSON bytes: depth and container count, before any parser runs."""

from __future__ import annotations

import orjson
import pytest

from services.gateway.bodies import MAX_JSON_DEPTH, json_shape_error, load_object
from shared.errors import InvalidRequest


def arrays(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def objects(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


@pytest.mark.parametrize(
    ("raw", "deep"),
    [
        (arrays(64), False),
        (arrays(65), True),
        (objects(64), False),
        (objects(65), True),
        (b"[" + b",".join([arrays(63)] * 50) + b"]", False),  # wide, each branch at the limit
        (b"[" + b",".join([arrays(63)] * 50 + [arrays(64)]) + b"]", True),
        # Depth reached step by step, never many openings in a row.
        (b"[" + b"0,[" * 64 + b"]" * 64 + b"]", True),
        # Brackets inside strings do not count, escaped quotes do not end a string ...
        (b'["' + b"[" * 100 + b'"]', False),
        (b'["\\"' + b"[" * 100 + b'"]', False),
        # ... but an escaped backslash does not escape the quote after it.
        (b'["\\\\",' + arrays(64) + b"]", True),
        # Strings of closing brackets cannot hide depth.
        (b"[" + b'"]]",[' * 70 + b"]" * 70 + b"]", True),
    ],
)
def test_depth_is_counted_outside_strings(raw: bytes, deep: bool) -> None:
    orjson.loads(raw)  # each case is valid JSON
    error = json_shape_error(raw)
    assert (error == f"the body nests deeper than {MAX_JSON_DEPTH} levels") is deep, error


def test_a_body_past_the_parsers_own_limit_is_named_too_deep() -> None:
    with pytest.raises(InvalidRequest, match="nests deeper than 64 levels"):
        load_object(b'{"a": ' + arrays(5000) + b"}")


def test_arrays_and_objects_are_counted_outside_strings() -> None:
    many = orjson.dumps({"a": [[] for _ in range(19_998)]})  # 20000 with the outer two
    assert json_shape_error(many) is None
    assert json_shape_error(many.replace(b"[[]", b"[[],[]", 1)) == (
        "the body holds more than 20000 arrays and objects"
    )
    in_strings = orjson.dumps({"a": ["[]{}" * 20_000]})
    assert json_shape_error(in_strings) is None

"""bench/bfcl.py's lenient scoring: which text counts as a call the model wrote (it sets the peer's lenient figure)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_bfcl", Path(__file__).parents[1] / "bench" / "bfcl.py")
assert _spec is not None and _spec.loader is not None
bfcl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bfcl)


def test_bare_json_calls_are_found_in_fences_lists_and_wrappers() -> None:
    text = ('Sure:\n```json\n{"name": "spotify_play", "arguments": {"artist": "Maroon 5", "duration": 15}}\n```\n'
            'and {"tool_calls": [{"name": "f", "arguments": "{\\"x\\": [1, {\\"y\\": 2}]}"}]} done {not json')
    assert bfcl.bare_calls(text) == [("spotify_play", {"artist": "Maroon 5", "duration": 15}),
                                     ("f", '{"x": [1, {"y": 2}]}')]


def test_an_echoed_tool_listing_or_plain_text_is_no_call() -> None:
    echo = '<tools>\n{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}'
    assert bfcl.bare_calls(echo) == []
    assert bfcl.bare_calls("Paris is sunny, {21 degrees}.") == []
    assert bfcl.bare_calls(None) == []


def test_calls_decode_to_bfcl_names_and_argument_objects() -> None:
    names = {"spotify_play": "spotify.play"}
    decoded = bfcl.decode([("spotify_play", '{"artist": "A"}'), ("other", {"n": 1})], names)
    assert decoded == [{"spotify.play": {"artist": "A"}}, {"other": {"n": 1}}]
    with pytest.raises(ValueError):
        bfcl.decode([("spotify_play", '["A"]')], names)
    with pytest.raises(ValueError):
        bfcl.decode([("spotify_play", '{"artist": "A"')], names)

"""The server's request parsing (no server running): every refusal names the field and what it must be."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from diffstage.errors import RequestError  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    from diffstage.builder import compose_config
    from diffstage.run_config import parse_run_config
    from diffstage.server.pool import ModelPool

    return ModelPool(parse_run_config(compose_config([])), None).get(None)  # checked, nothing loaded


@pytest.mark.parametrize("body, form, message", [
    ({}, False, "prompt must be a non-empty string, got None"),
    ({"prompt": "x", "n": 0}, False, "n must be an integer in [1, 16], got 0"),
    ({"prompt": "x", "response_format": "xml"}, False, "response_format must be one of b64_json, url, got 'xml'"),
    ({"prompt": "x", "output_format": "gif"}, False, "output_format must be one of png, jpeg, webp, got 'gif'"),
    ({"prompt": "x", "partial_images": 4}, False, "partial_images must be an integer in [0, 3], got 4"),
    ({"prompt": "x", "output_compression": 101}, False, "output_compression must be an integer in [0, 100], got 101"),
    ({"prompt": "x", "stream": "maybe"}, True, "stream must be true or false, got 'maybe'"),
    ({"prompt": "x", "stream": 1}, False, "stream must be true or false, got 1"),
    ({"prompt": "x", "seed": "abc"}, True, "seed must be a number, got 'abc'"),
])
def test_bad_fields_are_named(digits, body, form, message):
    from diffstage.server.images_api import GENERATION_FIELDS
    from diffstage.server.openai_api import parse_image_request

    with pytest.raises(RequestError) as e:
        parse_image_request(body, digits, GENERATION_FIELDS, form=form)
    assert str(e.value) == message


def test_form_strings_are_read_by_type(digits):
    from diffstage.server.images_api import GENERATION_FIELDS
    from diffstage.server.openai_api import parse_image_request

    parsed = parse_image_request({"prompt": "x", "seed": "7", "num_inference_steps": "3", "n": "2",
                                  "stream": "true"}, digits, GENERATION_FIELDS, form=True)
    assert (parsed.seed, parsed.fields["num_inference_steps"], parsed.fields["num_images_per_prompt"],
            parsed.stream) == (7, 3, 2, True)


def test_seconds_become_4k_plus_1_frames():
    from diffstage.server.openai_api import frames_for

    assert frames_for("4", 16) == 65 and frames_for(0.1, 16) == 5
    for bad in ("abc", "0", "61", "nan"):
        with pytest.raises(RequestError, match=r"seconds must be a number of seconds in \(0, 60\], got "):
            frames_for(bad, 16)


def test_stored_files_keep_within_their_cap(monkeypatch):
    from diffstage.server import media

    monkeypatch.setattr(media, "MAX_STORED_BYTES", 10)
    store = media.FileStore(ttl_s=60)
    first = store.put(b"123456", "image/png", ".png")
    second = store.put(b"abcdef", "image/png", ".png")  # 12 bytes: the oldest goes
    assert store.get(first) is None and store.get(second) == (b"abcdef", "image/png")
    assert store._bytes == 6

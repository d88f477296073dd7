"""`diffstage serve` driven by the official `openai` client, unchanged, on the embedded digits model: answers
equal to `diffstage generate`, batching, errors (status and message), the API key, models, health and metrics."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_util import b64_pixels, client, http_get, metric, png_pixels, running_server  # noqa: E402

PROMPTS = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven")]
# Batching changes the batch shape of every matmul, so floats round differently (not bit for bit): a batched
# image may differ from the one served alone by at most this many levels of 255 in any pixel.
BATCH_TOLERANCE = 2


def wait_until(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def digits_server():
    # a wide window, so that requests sent together surely share a pipeline call
    with running_server(max_batch=8, max_wait_ms=300) as (url, state):
        yield url, state


def test_alone_equals_diffstage_generate(digits_server, tmp_path):
    """A request served alone is `diffstage generate` with that seed, pixel for pixel (b64_json and url)."""
    url, _ = digits_server
    c = client(url)
    served = c.images.generate(model="digits", prompt="a handwritten digit seven", extra_body={"seed": 11})
    assert served.data[0].b64_json and served.data[0].url is None
    done = subprocess.run([str(Path(sys.executable).parent / "diffstage"), "generate", "seed=11",
                           "prompt=a handwritten digit seven", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cli = png_pixels(Path(done.stdout.strip().splitlines()[-1]).read_bytes())
    assert np.array_equal(b64_pixels(served.data[0].b64_json), cli)
    linked = c.images.generate(model="digits", prompt="a handwritten digit seven", response_format="url",
                               extra_body={"seed": 11})
    status, body = http_get(linked.data[0].url)
    assert status == 200 and np.array_equal(png_pixels(body), cli)
    assert http_get(linked.data[0].url.replace("file_", "file_x"))[0] == 404


def test_n_images_and_output_formats(digits_server):
    url, _ = digits_server
    c = client(url)
    one = b64_pixels(c.images.generate(prompt=PROMPTS[3], extra_body={"seed": 5}).data[0].b64_json)
    two = c.images.generate(prompt=PROMPTS[3], n=2, extra_body={"seed": 5})
    assert len(two.data) == 2
    first, second = (b64_pixels(d.b64_json) for d in two.data)
    assert np.abs(first - one).max() <= BATCH_TOLERANCE and not np.array_equal(first, second)
    jpeg = c.images.generate(prompt=PROMPTS[3], output_format="jpeg", extra_body={"seed": 5})
    import base64
    assert base64.b64decode(jpeg.data[0].b64_json)[:3] == b"\xff\xd8\xff"  # a JPEG


def test_concurrent_requests_share_a_batch_and_each_gets_its_seed(digits_server):
    """Requests sent together run as one pipeline call; each image is the one its seed gives alone."""
    url, _ = digits_server
    c = client(url)
    answers = {}

    def ask(i):
        steps = {"num_inference_steps": 300} if i == 7 else {}
        answers[i] = c.images.generate(prompt=PROMPTS[i], extra_body={"seed": 100 + i, **steps})

    # a long request keeps the model busy, so that the six surely wait together for the next call
    busy = threading.Thread(target=ask, args=(7,))
    busy.start()
    wait_until(lambda: metric(url, "diffstage_running_images", model="digits") == 1, "the busy request runs")
    calls_before = metric(url, "diffstage_batch_size_count", model="digits")
    images_before = metric(url, "diffstage_batch_size_sum", model="digits")
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: metric(url, "diffstage_queue_depth", model="digits") == 6, "six requests wait")
    for t in threads + [busy]:
        t.join(120)
    calls = metric(url, "diffstage_batch_size_count", model="digits") - calls_before
    images = metric(url, "diffstage_batch_size_sum", model="digits") - images_before
    assert (calls, images) == (2, 7)  # the busy request's call, then one call for the six
    for i in range(6):
        alone = c.images.generate(prompt=PROMPTS[i], extra_body={"seed": 100 + i})
        batched = b64_pixels(answers[i].data[0].b64_json)
        assert np.abs(batched - b64_pixels(alone.data[0].b64_json)).max() <= BATCH_TOLERANCE
    assert not np.array_equal(b64_pixels(answers[0].data[0].b64_json), b64_pixels(answers[1].data[0].b64_json))


def test_errors_have_the_right_status_and_message(digits_server):
    from diffstage.builder import compose_config, plan_from_config
    from diffstage.errors import RequestError

    url, _ = digits_server
    c = client(url)
    with pytest.raises(openai.NotFoundError, match=r"model 'digit' is not served here \(did you mean 'digits'\?\); "
                                                   r"served: digits"):
        c.images.generate(model="digit", prompt="x")
    with pytest.raises(openai.BadRequestError) as bad:
        c.images.generate(prompt="x", size="33x32")
    with pytest.raises(RequestError) as cli:  # what the CLI prints for sampling.width=33
        plan_from_config(compose_config(["sampling.width=33"])).request(prompt="x", seed=0)
    assert bad.value.body["message"] == str(cli.value)
    assert "width must be a positive multiple of 16" in str(cli.value)
    with pytest.raises(openai.BadRequestError, match=r"size must be WIDTHxHEIGHT such as 1024x1024 \(or auto\), "
                                                     r"got 'big'"):
        c.images.generate(prompt="x", size="big")
    with pytest.raises(openai.BadRequestError, match=r"unknown field 'sede' \(did you mean 'seed'\?\)"):
        c.images.generate(prompt="x", extra_body={"sede": 1})
    with pytest.raises(openai.BadRequestError, match="num_inference_steps must be an integer in"):
        c.images.generate(prompt="x", extra_body={"num_inference_steps": 0})
    with pytest.raises(openai.BadRequestError, match="cache must be one of first_block, none, teacache"):
        c.images.generate(prompt="x", extra_body={"cache": "fast"})
    assert metric(url, "diffstage_requests_total", model="none", endpoint="generations", outcome="not_found") >= 1
    assert metric(url, "diffstage_requests_total", model="digits", endpoint="generations", outcome="bad_request") >= 1


def test_a_request_may_pick_a_step_cache(digits_server):
    url, state = digits_server
    c = client(url)
    plain = b64_pixels(c.images.generate(prompt=PROMPTS[2], extra_body={"seed": 4}).data[0].b64_json)
    cached = b64_pixels(c.images.generate(prompt=PROMPTS[2], extra_body={"seed": 4, "cache": "first_block"})
                        .data[0].b64_json)
    assert set(state.pool.models["digits"].pipelines) == {"none", "first_block"}
    assert np.abs(cached - plain).mean() < 20  # the same digit, approximately (the cache skips steps)


def test_models_health_ready_metrics(digits_server):
    url, _ = digits_server
    c = client(url)
    models = c.models.list()
    assert [m.id for m in models.data] == ["digits"]
    assert c.models.retrieve("digits").id == "digits"
    assert http_get(f"{url}/health") == (200, b'{"status":"ok"}')
    status, body = http_get(f"{url}/ready")
    assert status == 200 and b'"loaded":["digits"]' in body
    text = http_get(f"{url}/metrics")[1].decode()
    for name in ("diffstage_requests_total", "diffstage_request_seconds_bucket", "diffstage_queue_depth",
                 "diffstage_batch_size_bucket", "diffstage_stage_seconds_bucket", "diffstage_images_generated_total",
                 "diffstage_models_loaded"):
        assert name in text, name
    assert metric(url, "diffstage_images_generated_total", model="digits") >= 1


def test_api_key():
    with running_server(api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            client(url).images.generate(prompt=PROMPTS[1], extra_body={"seed": 1})
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert len(client(url, api_key="s3cret").images.generate(prompt=PROMPTS[1], extra_body={"seed": 1}).data) == 1
        assert http_get(f"{url}/health")[0] == 200  # a probe needs no key
        assert http_get(f"{url}/metrics")[0] == 401
        assert http_get(f"{url}/metrics", {"Authorization": "Bearer s3cret"})[0] == 200


def test_several_models_load_on_use_and_unload_least_recently_used(tiny_flux_dev):
    """Two models, a budget below both: each loads on first use and unloads the other."""
    with running_server(preload=False, memory_budget_gb=0.001,
                        models=["digits", {"model": "flux", "model_path": str(tiny_flux_dev)}]) as (url, state):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["digits", "flux"]
        assert state.pool.loaded() == []
        c.images.generate(model="digits", prompt=PROMPTS[1], extra_body={"seed": 1})
        assert state.pool.loaded() == ["digits"]
        flux = c.images.generate(model="flux", prompt="a cat", size="64x64",
                                 extra_body={"seed": 1, "num_inference_steps": 2})
        assert b64_pixels(flux.data[0].b64_json).shape == (64, 64, 3)
        assert state.pool.loaded() == ["flux"]  # digits was idle and least recently used


def test_serve_settings_errors():
    from diffstage.errors import DiffstageError
    from diffstage.overrides import prepare_overrides
    from diffstage.server import serve_settings

    with pytest.raises(DiffstageError) as e:
        serve_settings({"port": -1, "max_batch": 0, "models": []})
    assert str(e.value) == (
        "invalid serve settings:\n"
        "  - serve.port must be an integer in [0, 65535], got -1\n"
        "  - serve.max_batch must be an integer in [1, 4096], got 0\n"
        "  - serve.models must be a non-empty list of model names or YAML paths, each alone or as "
        "{model: NAME_OR_YAML, model_path: DIR_OR_REPO_ID}, got []")
    with pytest.raises(DiffstageError, match=r"unknown key 'serve.prot' \(did you mean 'port'\?\)"):
        prepare_overrides(["serve.prot=1"], sheet=True)


def test_request_deadline():
    """A request still running at serve.request_timeout_s gets 504 and its run stops between steps."""
    with running_server(request_timeout_s=1.5) as (url, _):
        with pytest.raises(openai.APIStatusError) as e:
            client(url).images.generate(prompt=PROMPTS[1], extra_body={"seed": 1, "num_inference_steps": 1000})
        assert e.value.status_code == 504
        assert "did not finish within serve.request_timeout_s=1.5 seconds" in e.value.message
        for _ in range(100):
            if metric(url, "diffstage_calls_cancelled_total", model="digits") >= 1:
                break
            time.sleep(0.05)
        assert metric(url, "diffstage_calls_cancelled_total", model="digits") == 1


def test_diffstage_serve_command_shuts_down_gracefully(tmp_path):
    """`diffstage serve` from the command line: serves, and on SIGTERM lets the running request finish, then
    reports the shutdown and exits 0 (a signal that asked for a graceful stop got one)."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "diffstage"), "serve", f"serve.port={port}",
                               "serve.max_wait_ms=1", "serve.shutdown_grace_s=600", f"hydra.run.dir={tmp_path}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if http_get(f"{url}/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        answer = {}
        asking = threading.Thread(target=lambda: answer.setdefault("r", client(url).images.generate(
            prompt=PROMPTS[4], extra_body={"seed": 2, "num_inference_steps": 400})))
        asking.start()
        wait_until(lambda: metric(url, "diffstage_running_images", model="digits") == 1, "the request runs")
        server.send_signal(signal.SIGTERM)
        asking.join(60)
        _, err = server.communicate(timeout=60)
    finally:
        server.kill() if server.poll() is None else None
    assert server.returncode == 0, err
    assert len(answer["r"].data) == 1  # the running request finished after the signal
    assert "serving digits on http://127.0.0.1:" in err
    assert not (tmp_path / ".hydra").exists()  # the command line (an API key) is not written to disk
    assert err.index("Shutting down") < err.index('"path": "/v1/images/generations", "status": 200') < \
        err.index("shutdown: 0 running requests finished or cancelled, 0 waiting requests cancelled")


def test_malformed_requests_get_openai_shaped_errors(digits_server):
    import urllib.request

    url, _ = digits_server

    def post(path, data: bytes, content_type="application/json", headers=None):
        request = urllib.request.Request(f"{url}{path}", data=data, method="POST",
                                         headers={"Content-Type": content_type, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    import json
    status, body = post("/v1/images/generations", b"{not json")
    assert status == 400 and json.loads(body)["error"]["message"].startswith("the request body is not JSON")
    status, body = post("/v1/images/generations", b"[1, 2]")
    assert (status, json.loads(body)["error"]["message"]) == (400, "the request body must be a JSON object")
    status, body = http_get(f"{url}/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["message"] == "GET /v1/nothing: Not Found"
    status, body = http_get(f"{url}/v1/images/generations")
    assert status == 405 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = post("/v1/images/generations", b"{}", headers={"Content-Length": str(2 ** 30)})
    assert (status, json.loads(body)["error"]["message"]) == (413, "the request is larger than 65 MiB")
    with pytest.raises(openai.BadRequestError, match="image: in.png is not an image in one of the formats"):
        client(url).images.edit(image=("in.png", b"not an image", "image/png"), prompt="x")
    with pytest.raises(openai.BadRequestError, match="model 'digits' takes no input image"):
        import io

        from PIL import Image
        png = io.BytesIO()
        Image.new("RGB", (32, 32)).save(png, format="PNG")
        client(url).images.edit(image=("in.png", png.getvalue(), "image/png"), prompt="x")
    status, body = http_get(f"{url}/v1/videos/video_nope")
    assert status == 404 and "no video job 'video_nope'" in json.loads(body)["error"]["message"]

"""The server under faults, all at once: clients that disconnect mid-request, a burst beyond the queue bound,
and a request that raises inside a stage, while steady clients run. Every steady request completes with the
right image, the others fail alone (499 / 429 with Retry-After / 500), and the server keeps serving."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_util import b64_pixels, client, metric, running_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TOLERANCE = 2  # levels of 255: a batched image against the same request alone (batch shapes round differently)


def _model_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "digits_faulty.yaml"
    path.write_text("extends: digits\nname: digits_faulty\n"
                    f"model_path: {REPO / 'models' / 'digits' / 'checkpoint'}\n"
                    "pipeline_config:\n  callbacks:\n    latent_preparation:\n"
                    "      pack: fault_callbacks.pack_or_explode\n")
    return path


def _ask_until_accepted(c, prompt: str, seed: int, results: dict, key, deadline: float) -> None:
    """A well-behaved client: on 429 it waits Retry-After and asks again (bounded by `deadline`)."""
    while time.monotonic() < deadline:
        try:
            results[key] = c.images.generate(model="digits_faulty", prompt=prompt, extra_body={"seed": seed})
            return
        except openai.RateLimitError as e:
            results.setdefault("retry_after", []).append(e.response.headers.get("retry-after"))
            time.sleep(min(float(e.response.headers.get("retry-after", 1)), 1.0))
    results[key] = TimeoutError("no answer before the test's deadline")


def _wait_admitted(url, model, n, deadline):
    """Until `n` requests of `model` are queued or running (or the deadline passes)."""
    while time.monotonic() < deadline:
        if metric(url, "diffstage_queue_depth", model=model) + metric(url, "diffstage_running_images", model=model) >= n:
            return
        time.sleep(0.02)


def test_faults_affect_only_their_own_request(tmp_path):
    from diffstage import build_pipeline

    yaml_path = _model_yaml(tmp_path)
    overrides = [f"model={yaml_path}", "allowlist=[fault_callbacks]"]
    steady = [(f"a handwritten digit {WORDS[i % 10]}", 500 + i) for i in range(12)]
    burst = [(f"a handwritten digit {WORDS[i % 10]}", 700 + i) for i in range(16)]
    with running_server(overrides, max_batch=8, max_wait_ms=50, queue_size=6) as (url, _):
        c = client(url)
        results, failures, deadline = {}, {}, time.monotonic() + 240

        def steady_client(k):
            for j in range(k, len(steady), 4):
                _ask_until_accepted(c, *steady[j], results, ("steady", j), deadline)

        def quitter(k):  # long requests whose client gives up after 1.5 s (their call runs by then)
            try:
                client(url).with_options(timeout=1.5).images.generate(
                    model="digits_faulty", prompt="a handwritten digit one",
                    extra_body={"seed": k, "num_inference_steps": 400})
            except Exception as e:  # noqa: BLE001
                failures[("quitter", k)] = e

        def exploder(k):
            while time.monotonic() < deadline:
                try:
                    c.images.generate(model="digits_faulty", prompt="explode", extra_body={"seed": k})
                except openai.RateLimitError:  # the burst filled the queue: ask again
                    time.sleep(0.2)
                except Exception as e:  # noqa: BLE001
                    failures[("explode", k)] = e
                    return

        def bursty(j):
            try:
                results[("burst", j)] = c.images.generate(model="digits_faulty", prompt=burst[j][0],
                                                          extra_body={"seed": burst[j][1]})
            except Exception as e:  # noqa: BLE001
                failures[("burst", j)] = e

        # the quitters first (into an empty queue), then the steady clients and the exploders, then the burst
        threads = [threading.Thread(target=quitter, args=(k,)) for k in range(3)]
        threads += [threading.Thread(target=steady_client, args=(k,)) for k in range(4)]
        threads += [threading.Thread(target=exploder, args=(k,)) for k in range(2)]
        threads += [threading.Thread(target=bursty, args=(j,)) for j in range(len(burst))]
        for i, t in enumerate(threads):
            t.start()
            if i == 2:  # the quitters admitted before anyone else (a loaded machine can delay their requests)
                _wait_admitted(url, "digits_faulty", 3, time.monotonic() + 30)
            if i == 8:
                time.sleep(0.1)
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads)

        # the others failed alone, each as it should
        assert all(isinstance(failures[("quitter", k)], openai.APITimeoutError) for k in range(3))
        for k in range(2):
            assert isinstance(failures[("explode", k)], openai.InternalServerError)
            assert "boom: this prompt breaks the stage" in failures[("explode", k)].message
        rejected = [e for key, e in failures.items() if key[0] == "burst"]
        assert rejected and all(isinstance(e, openai.RateLimitError) for e in rejected)
        assert all(e.response.headers.get("retry-after", "").isdigit() for e in rejected)
        # the long requests of the clients that left were stopped between denoising steps, not run to the end
        for _ in range(100):
            if metric(url, "diffstage_calls_cancelled_total", model="digits_faulty") >= 1:
                break
            time.sleep(0.1)
        assert metric(url, "diffstage_calls_cancelled_total", model="digits_faulty") >= 1
        assert metric(url, "diffstage_requests_total", model="digits_faulty", endpoint="generations",
                      outcome="rejected") >= len(rejected) + len(results.get("retry_after", []))
        # and the server goes on serving
        after = c.images.generate(model="digits_faulty", prompt="a handwritten digit two", extra_body={"seed": 1})
        assert len(after.data) == 1

    # every steady and accepted burst request got the image its prompt and seed give alone
    pipe = build_pipeline(str(yaml_path), overrides=["allowlist=[fault_callbacks]"])
    answered = [(steady[j], results[("steady", j)]) for j in range(len(steady))]
    answered += [(burst[j], results[("burst", j)]) for j in range(len(burst)) if ("burst", j) in results]
    assert len(answered) == len(steady) + len(burst) - len(rejected)
    for (prompt, seed), response in answered:
        assert not isinstance(response, Exception), response
        expected = np.asarray(pipe(prompt, seed=seed).images[0]).astype(np.int16)
        assert np.abs(b64_pixels(response.data[0].b64_json) - expected).max() <= TOLERANCE, (prompt, seed)


def test_out_of_memory_in_a_stage_is_503_and_the_server_goes_on(tmp_path):
    overrides = [f"model={_model_yaml(tmp_path)}", "allowlist=[fault_callbacks]"]
    with running_server(overrides) as (url, _):
        c = client(url)
        with pytest.raises(openai.APIStatusError) as e:
            c.images.generate(model="digits_faulty", prompt="oom", extra_body={"seed": 1})
        assert e.value.status_code == 503
        assert e.value.body["message"] == ("out of memory: LatentPreparationStage: callback 'latent_preparation.pack' "
                                           "(fault_callbacks.pack_or_explode) failed: MemoryError: cannot allocate "
                                           "the latents")
        assert metric(url, "diffstage_requests_total", model="digits_faulty", endpoint="generations",
                      outcome="out_of_memory") == 1
        assert len(c.images.generate(model="digits_faulty", prompt="a handwritten digit one",
                                     extra_body={"seed": 1}).data) == 1


def test_a_stream_to_a_full_queue_is_a_429():
    """A streamed request is queued before its stream starts, so a full queue answers it 429 like any other."""
    with running_server(queue_size=1) as (url, _):
        leaving = client(url).with_options(timeout=3)

        def long_request(seed):
            try:
                leaving.images.generate(prompt="a handwritten digit one", extra_body={"seed": seed,
                                                                                     "num_inference_steps": 1000})
            except openai.APITimeoutError:
                pass

        threads = [threading.Thread(target=long_request, args=(seed,)) for seed in (1, 2)]
        threads[0].start()
        for _ in range(200):  # the first runs
            if metric(url, "diffstage_running_images", model="digits") == 1:
                break
            time.sleep(0.02)
        threads[1].start()
        for _ in range(200):  # the second waits
            if metric(url, "diffstage_queue_depth", model="digits") == 1:
                break
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError, match="has 1 requests waiting"):
            client(url).images.generate(prompt="a handwritten digit two", stream=True, partial_images=1)
        for t in threads:
            t.join(30)

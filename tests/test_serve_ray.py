"""`diffstage serve serve.backend=ray`: two replicas of the digits server behind Ray Serve's HTTP proxy, driven by
the official `openai` client, unchanged. Each replica answers as one uvicorn server does (its images, its errors,
the API key, SSE streams), says which replica it is (X-Diffstage-Replica) and keeps its own /metrics; the command
itself serves and stops cleanly on SIGTERM. The serve.backend settings are checked without Ray.

Ray's own processes listen on every interface (only its HTTP proxy takes serve.host), so the tests that start
Ray run in a network namespace of their own whose only interface is loopback (`unshare -rn`): the test
`test_ray_runs_in_a_network_namespace_of_its_own` runs this file again there."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_util import b64_pixels, client, free_port, http_get, metric, running_server, wait_ready  # noqa: E402
from test_serve import BATCH_TOLERANCE, PROMPTS  # noqa: E402

NETNS = "DIFFSTAGE_TEST_NETNS"  # set inside the namespace
in_netns = pytest.mark.skipif(os.environ.get(NETNS) != "1", reason="starts Ray: runs inside a network namespace of "
                              "its own (test_ray_runs_in_a_network_namespace_of_its_own)")
API_KEY = "s3cret"
HEADER = "x-diffstage-replica"
SEEDS = range(200, 208)


# --- the settings, without Ray ----------------------------------------------------------------------------

@pytest.mark.parametrize("section, message", [
    ({"backend": "rayserve"}, "serve.backend must be one of uvicorn, ray, got 'rayserve'"),
    ({"backend": "ray", "replicas": 0}, "serve.replicas must be an integer in [1, 4096], got 0"),
    ({"backend": "ray", "replicas": 2, "ray": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}},
     "serve.replicas and serve.ray.autoscaling_config are exclusive (Ray Serve takes a fixed number of replicas "
     "or an autoscaling range, not both): drop one"),
    ({"backend": "ray", "ray": {"num_replicas": 2}}, "serve.ray.num_replicas: set serve.replicas instead"),
    ({"backend": "ray", "ray": [1]}, "serve.ray must be a mapping of option names to values, got [1]"),
    ({"replicas": 2}, "serve.replicas apply to serve.backend=ray only (serve.backend is uvicorn)"),
])
def test_backend_settings_errors(section, message):
    from diffstage.errors import DiffstageError
    from diffstage.server import serve_settings

    with pytest.raises(DiffstageError) as e:
        serve_settings(section)
    assert str(e.value) == f"invalid serve settings:\n  - {message}"


def test_backend_settings_default_and_ray():
    from diffstage.server import serve_settings

    plain = serve_settings({"backend": "uvicorn", "replicas": None, "ray": {}, "ray_init": {}})
    assert (plain.backend, plain.replicas, plain.ray, plain.ray_init) == ("uvicorn", None, None, None)
    scaled = serve_settings({"backend": "ray", "ray": {"autoscaling_config": {"max_replicas": 4}}})
    assert scaled.ray == {"autoscaling_config": {"max_replicas": 4}} and scaled.replicas is None


def test_deployment_options():
    """Each replica gets an equal share of the CPUs (torch threads follow it); an unknown option is refused."""
    pytest.importorskip("ray")
    from diffstage.errors import DiffstageError
    from diffstage.server import ray_backend, serve_settings

    two = ray_backend.deployment_options(serve_settings({"backend": "ray", "replicas": 2}), cpus=4)
    assert two["num_replicas"] == 2 and two["ray_actor_options"] == {"num_cpus": 2}
    assert two["max_ongoing_requests"] == 64 + 8  # serve.queue_size + serve.max_batch: the replica's 429 decides
    four = ray_backend.deployment_options(serve_settings({"backend": "ray", "replicas": 4}), cpus=2)
    assert four["ray_actor_options"] == {"num_cpus": 0.5}  # more replicas than CPUs: a share each, still placeable
    scaled = ray_backend.deployment_options(serve_settings({"backend": "ray", "ray": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}, "ray_actor_options": {"num_cpus": 3}}}), 8)
    assert "num_replicas" not in scaled and scaled["ray_actor_options"] == {"num_cpus": 3}
    with pytest.raises(DiffstageError, match=r"serve.ray: unknown Ray Serve deployment option 'autoscaling' "
                                             r"\(did you mean 'autoscaling_config'\?\)"):
        ray_backend.deployment_options(serve_settings({"backend": "ray", "ray": {"autoscaling": {}}}), 2)


def test_video_models_are_served_by_one_replica():
    pytest.importorskip("ray")
    from diffstage.errors import DiffstageError
    from diffstage.server import ray_backend, serve_settings

    for section in ({"replicas": 2}, {"ray": {"autoscaling_config": {"max_replicas": 2}}}):
        with pytest.raises(DiffstageError, match=r"^serve.backend=ray serves video models \(wan_t2v\) with one "
                                                 r"replica only: a video job lives in the replica that runs it"):
            ray_backend.check_video_models(["wan_t2v"], serve_settings({"backend": "ray", **section}))
    ray_backend.check_video_models(["wan_t2v"], serve_settings({"backend": "ray", "replicas": 1}))
    ray_backend.check_video_models([], serve_settings({"backend": "ray", "replicas": 2}))


def test_without_ray_the_command_names_the_extra(monkeypatch):
    import diffstage.server
    from diffstage.builder import compose_config
    from diffstage.cli.serve import serve_on_ray
    from diffstage.errors import DiffstageError
    from diffstage.run_config import parse_run_config
    from diffstage.server import serve_settings

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when it is not installed
    monkeypatch.delitem(sys.modules, "diffstage.server.ray_backend", raising=False)
    monkeypatch.delattr(diffstage.server, "ray_backend", raising=False)
    with pytest.raises(DiffstageError, match=r"^diffstage serve serve.backend=ray needs the ray extra: pip install "
                                             r"'diffstage\[ray\]' \(.*ray"):
        serve_on_ray(parse_run_config(compose_config([])), serve_settings({"backend": "ray"}))


# --- the tests that start Ray, in a network namespace whose only interface is loopback --------------------------

def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(os.environ.get(NETNS) == "1", reason="this is the run inside the namespace")
def test_ray_runs_in_a_network_namespace_of_its_own():
    pytest.importorskip("ray")
    if not _unshare_works():
        pytest.skip("Ray listens on every interface; its tests run only inside a network namespace of their own, "
                    "and `unshare -rn` (util-linux, user namespaces) is not available here")
    inner = f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider -rs {__file__} -k 'not " \
            "test_ray_runs_in_a_network_namespace_of_its_own'"
    done = subprocess.run(["unshare", "-rn", "sh", "-c", inner], capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, NETNS: "1"})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, done.stdout[-3000:]


# --- the command ------------------------------------------------------------------------------------------

@in_netns
def test_diffstage_serve_on_ray_command_serves_and_stops_on_sigterm(tmp_path):
    """`diffstage serve serve.backend=ray` from the command line: a replica answers through Ray's proxy; on
    SIGTERM the running request finishes, the deployment is deleted, Ray stops and the command exits 0."""
    pytest.importorskip("ray")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "diffstage"), "serve", "serve.backend=ray",
                               "serve.replicas=1", f"serve.port={port}", "serve.max_wait_ms=1",
                               "serve.shutdown_grace_s=60", "serve.ray_init={address: local, num_cpus: 2}",
                               f"hydra.run.dir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, 150, alive=lambda: server.poll() is None)
        answer = {}
        asking = threading.Thread(target=lambda: answer.setdefault("r", client(url).images.with_raw_response
                                  .generate(prompt=PROMPTS[4], extra_body={"seed": 2, "num_inference_steps": 200})))
        asking.start()
        deadline = time.monotonic() + 60
        while metric(url, "diffstage_running_images", model="digits") != 1:  # one replica: its metrics
            assert time.monotonic() < deadline and asking.is_alive(), "the request did not start"
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        asking.join(90)
        _, err = server.communicate(timeout=90)
    finally:
        server.kill() if server.poll() is None else None
    assert server.returncode == 0, err[-3000:]
    assert answer["r"].status_code == 200 and len(answer["r"].parse().data) == 1  # finished after the signal
    assert answer["r"].headers[HEADER]
    assert f"serving digits on http://127.0.0.1:{port} (Ray Serve, 1 replica)" in err
    assert err.index("Shutting down: deleting the Ray Serve deployment") < \
        err.index("shutdown: the Ray Serve deployment is deleted, Ray stopped")


# --- two replicas in this process's Ray -------------------------------------------------------------------

@pytest.fixture(scope="module")
def references():
    """What one uvicorn server answers alone, for each seed (the same images `diffstage generate` makes:
    tests/test_serve.py)."""
    with running_server() as (url, _):
        c = client(url)
        return {seed: b64_pixels(c.images.generate(prompt=PROMPTS[seed % 8], extra_body={"seed": seed})
                                 .data[0].b64_json) for seed in SEEDS}


@pytest.fixture(scope="module")
def ray_replicas():
    if os.environ.get(NETNS) != "1":
        pytest.skip("starts Ray: runs inside a network namespace of its own "
                    "(test_ray_runs_in_a_network_namespace_of_its_own)")
    ray = pytest.importorskip("ray")
    from diffstage.builder import compose_config
    from diffstage.run_config import parse_run_config
    from diffstage.server import ray_backend, serve_settings

    settings = serve_settings({"backend": "ray", "replicas": 2, "port": free_port(), "max_wait_ms": 300,
                               "api_key": API_KEY, "shutdown_grace_s": 10})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield ray_backend.deploy(parse_run_config(compose_config([])), settings)  # every replica loaded
    finally:
        assert ray_backend.stop(True, 60)


def ask(url: str, seed: int, **extra):
    """One request's (replica, pixels)."""
    answer = client(url, API_KEY).images.with_raw_response.generate(prompt=PROMPTS[seed % 8],
                                                                      extra_body={"seed": seed, **extra})
    return answer.headers[HEADER], b64_pixels(answer.parse().data[0].b64_json)


def test_both_replicas_answer_as_one_server_does(ray_replicas, references):
    """Requests sent together spread over the two replicas (each batching its share); every image is the one
    its seed gives alone (within BATCH_TOLERANCE), and one served alone by either replica is pixel-equal."""
    replicas, answers = set(), {}
    for _ in range(3):  # Ray's router picks replicas by their queues: together, both surely get work
        threads = [threading.Thread(target=lambda s=s: answers.__setitem__(s, ask(ray_replicas, s))) for s in SEEDS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        replicas |= {replica for replica, _ in answers.values()}
        if len(replicas) == 2:
            break
    assert len(replicas) == 2 and len(answers) == len(SEEDS)
    for seed, (_, pixels) in answers.items():
        assert np.abs(pixels - references[seed]).max() <= BATCH_TOLERANCE
    alone = {}
    for k in range(20):  # one at a time, until each replica has answered alone
        replica, pixels = ask(ray_replicas, SEEDS[k % 8])
        alone.setdefault(replica, []).append(np.array_equal(pixels, references[SEEDS[k % 8]]))
        if len(alone) == 2:
            break
    assert len(alone) == 2 and all(all(equal) for equal in alone.values())


def test_errors_api_key_and_metrics_per_replica(ray_replicas):
    from diffstage.builder import compose_config, plan_from_config
    from diffstage.errors import RequestError

    c = client(ray_replicas, API_KEY)
    with pytest.raises(openai.BadRequestError) as bad:
        c.images.generate(prompt="x", size="33x32")
    with pytest.raises(RequestError) as cli:  # what the CLI (and one uvicorn server) says for sampling.width=33
        plan_from_config(compose_config(["sampling.width=33"])).request(prompt="x", seed=0)
    assert bad.value.body["message"] == str(cli.value)
    with pytest.raises(openai.NotFoundError, match=r"model 'digit' is not served here \(did you mean 'digits'\?\)"):
        c.images.generate(model="digit", prompt="x")
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        client(ray_replicas).images.generate(prompt=PROMPTS[1], extra_body={"seed": 1})
    assert http_get(f"{ray_replicas}/health")[0] == 200  # a probe needs no key
    assert http_get(f"{ray_replicas}/metrics")[0] == 401
    counts = {}
    for _ in range(40):  # each GET reaches one replica: its own counts
        status, text, replica = get_with_key(f"{ray_replicas}/metrics")
        assert status == 200
        counts[replica] = text.decode()
        if len(counts) == 2:
            break
    assert len(counts) == 2
    for text in counts.values():
        assert 'diffstage_images_generated_total{model="digits"}' in text


def get_with_key(url: str) -> tuple[int, bytes, str]:
    """Status, body and the replica that answered a GET with the API key."""
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.status, r.read(), r.headers[HEADER]


def test_a_url_answer_works_whichever_replica_the_link_reaches(ray_replicas, references):
    """The files `url` answers link to are kept for all replicas: each link answers from either one."""
    from serve_util import png_pixels

    links, makers, crossed = {}, {}, 0

    def make(seed):
        answer = client(ray_replicas, API_KEY).images.with_raw_response.generate(
            prompt=PROMPTS[seed % 8], response_format="url", extra_body={"seed": seed})
        links[seed] = answer.parse().data[0].url
        makers[seed] = answer.headers[HEADER]

    for _ in range(3):
        threads = [threading.Thread(target=make, args=(seed,)) for seed in SEEDS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if len(set(makers.values())) == 2:
            break
    assert len(set(makers.values())) == 2 and len(links) == len(SEEDS)
    for seed, link in links.items():
        for _ in range(4):
            status, body, replica = get_with_key(link)
            assert status == 200 and np.abs(png_pixels(body) - references[seed]).max() <= BATCH_TOLERANCE
            crossed += replica != makers[seed]
    assert crossed > 0  # some links were read from the replica that did not make them


def test_an_option_ray_refuses_is_a_diffstage_error(ray_replicas):
    from diffstage.builder import compose_config
    from diffstage.errors import DiffstageError
    from diffstage.run_config import parse_run_config
    from diffstage.server import ray_backend, serve_settings

    settings = serve_settings({"backend": "ray", "ray": {"max_ongoing_requests": 0}})
    with pytest.raises(DiffstageError, match=r"(?s)^serve.ray: Ray Serve refused the deployment options "
                                             r"\{'max_ongoing_requests': 0\}: .*max_ongoing_requests.*greater than 0"):
        ray_backend.deploy(parse_run_config(compose_config([])), settings)


def test_a_stream_passes_the_proxy(ray_replicas, references):
    seed = SEEDS[2]
    events = list(client(ray_replicas, API_KEY).images.generate(
        prompt=PROMPTS[seed % 8], stream=True, partial_images=2, extra_body={"seed": seed}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert np.array_equal(b64_pixels(events[-1].b64_json), references[seed])

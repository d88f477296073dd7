"""benchmarks/bench_serve.py: the load client's counting (429 retried and counted, a dropped connection lost),
the batch-size histogram read from Prometheus text, and the baseline configuration end to end on a real
uvicorn server with tiny counts. Timings are recorded, never asserted."""
import base64
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_serve  # noqa: E402

DROP_SEED = 13  # the stub server closes the connection without answering this seed


def png_answer() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(buffer, format="PNG")
    return json.dumps({"created": 0, "data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]}).encode()


class StubHandler(BaseHTTPRequestHandler):
    """Answers the first POST with 429 (Retry-After 0.1 s), drops DROP_SEED, answers the rest with one PNG."""
    first = threading.Event()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["seed"] == DROP_SEED:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if not self.first.is_set():
            self.first.set()
            self.send_response(429)
            self.send_header("Retry-After", "0.1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = png_answer()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_load_counts_429_retries_and_lost_requests():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        jobs = [(k % 10, 10 + k) for k in range(6)]  # seeds 10..15: one is DROP_SEED
        outcomes, _ = bench_serve.load(url, jobs, clients=2, timeout=10, time_limit=20)
    finally:
        server.shutdown()
        server.server_close()
    answers = bench_serve.count_answers(outcomes)
    assert answers["answers_429"] == 1 and answers["requests_retried"] == 1
    assert answers["lost"] == 1 and answers["final_2xx"] == 5 and answers["unsent"] == 0
    assert answers["undecodable"] == 0
    assert all(o.image.shape == (32, 32, 3) for o in outcomes if o.seed != DROP_SEED)


def test_batch_histogram_from_prometheus_text():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    sizes = Histogram(bench_serve.BATCH_METRIC, "requests per pipeline call", ["model"], registry=registry,
                      buckets=(1, 2, 4, 8, 16))
    sizes.labels(model="digits").observe(1)  # before the load: subtracted
    before = bench_serve.histogram_buckets(generate_latest(registry).decode(), bench_serve.BATCH_METRIC)
    for size in (1, 3, 4, 16, 16):
        sizes.labels(model="digits").observe(size)
    sizes.labels(model="other").observe(2)
    after = bench_serve.histogram_buckets(generate_latest(registry).decode(), bench_serve.BATCH_METRIC)
    histogram = bench_serve.batch_histogram(before, after)
    assert histogram == {"batches": 6, "requests_in_batches": 42, "mean_batch_size": 7.0,
                         "by_size": {"1": 1, "2": 1, "3-4": 2, "9-16": 2}}
    assert bench_serve.histogram_buckets("# nothing here\n", bench_serve.BATCH_METRIC) is None


def test_baseline_end_to_end(tmp_path):
    out = tmp_path / "bench_serve.json"
    report = bench_serve.main(["--configs", "baseline", "--clients", "2", "--requests", "4", "--warmup", "1",
                               "--time-limit", "60", "--start-timeout", "90", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert written["machine"]["cpu"] and "torch" in written["machine"] and "diffusers" in written["machine"]
    row = written["results"]["baseline"]
    assert row["answers"]["lost"] == 0 and row["answers"]["unsent"] == 0
    assert row["answers"]["final_2xx"] == 4 and row["images"] == 4 and row["answers"]["answers_5xx"] == 0
    assert row["batch_size"]["by_size"] == {"1": 4}
    assert set(row["latency_s"]) >= {"p50", "p95", "p99"} and row["images_per_s"] > 0
    assert row["server_cpu_s_per_image"] > 0  # the server's threads did the work, and were counted
    assert row["rss"]["samples"] >= 1 and row["rss"]["peak_mb"] > 0
    assert row["server_exit_code"] is not None  # the server was stopped, not left running
    assert written["ratios"]["lost_requests"] == 0 and written["ratios"]["throughput_batching_on_over_baseline"] is None


def test_agreement_compares_images_of_the_same_request():
    image = np.zeros((32, 32, 3), dtype=np.float32)
    shifted = image.copy()
    shifted[0, 0, 0] = 2 / 255
    ours = [bench_serve.Outcome(0, 1, 200, 0.1, [200], image), bench_serve.Outcome(1, 2, 200, 0.1, [200], shifted),
            bench_serve.Outcome(2, 3, None), None]
    reference = [bench_serve.Outcome(d, s, 200, 0.1, [200], image) for d, s in ((0, 1), (1, 2), (2, 3), (3, 4))]
    result = bench_serve.agreement(ours, reference)
    assert result["compared"] == 2 and result["identical"] == 1 and result["max_abs_diff"] == round(2 / 255, 4)


class ReplicasHandler(BaseHTTPRequestHandler):
    """GET /metrics as two replicas would answer it through one proxy: in turn, each with its own batch counts."""
    turn = [0]

    def do_GET(self):
        from prometheus_client import CollectorRegistry, Histogram, generate_latest

        replica = ("a", "b")[self.turn[0] % 2]
        self.turn[0] += 1
        registry = CollectorRegistry()
        sizes = Histogram(bench_serve.BATCH_METRIC, "images per call", ["model"], registry=registry,
                          buckets=(1, 2, 4))
        for size in {"a": (1, 4), "b": (2,)}[replica]:
            sizes.labels(model="digits").observe(size)
        payload = generate_latest(registry)
        self.send_response(200)
        self.send_header("X-Diffstage-Replica", replica)  # any case: HTTP names are case-insensitive
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_batch_sizes_are_summed_over_the_replicas():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ReplicasHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        both = bench_serve.read_metrics(url, replicas=2)
        one = bench_serve.read_metrics(url, replicas=1)
        never = bench_serve.read_metrics(url, replicas=3, attempts=4)  # a third replica never answers
    finally:
        server.shutdown()
        server.server_close()
    assert bench_serve.batch_histogram(None, both) == {"batches": 3, "requests_in_batches": 7,
                                                       "mean_batch_size": 2.333, "by_size": {"1": 1, "2": 1,
                                                                                             "3-4": 1}}
    assert one[1] in (1.0, 2.0) and never is None


def test_ray_configurations_run_the_batching_settings_on_ray():
    for config, replicas in (("ray_1", 1), ("ray_2", 2)):
        command = bench_serve.server_command(config, 8123, Path("diffstage"))
        assert command[:2] == ["diffstage", "serve"] and "serve.backend=ray" in command
        assert f"serve.replicas={replicas}" in command and set(bench_serve.BATCHING) <= set(command)
    ratios = bench_serve.ratios({"ray_1": {"images_per_s": 10.0, "server_cpu_s_per_image": 0.2,
                                           "latency_s": {"p99": 1.0}, "answers": {"lost": 0, "unsent": 0,
                                                                                  "answers_5xx": 0}},
                                 "ray_2": {"images_per_s": 15.0, "server_cpu_s_per_image": 0.25,
                                           "latency_s": {"p99": 0.8}, "answers": {"lost": 0, "unsent": 0,
                                                                                  "answers_5xx": 0}}})
    assert (ratios["throughput_ray_2_over_ray_1"], ratios["p99_ray_2_over_ray_1"]) == (1.5, 0.8)
    assert ratios["throughput_ray_1_over_batching_on"] is None

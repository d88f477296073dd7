"""Serving under load: `diffstage serve` with dynamic batching on and off, beside a baseline server written the
way most users would (benchmarks/serve_baseline.py: a FastAPI app with one Diffusers FluxPipeline behind a lock).

    python benchmarks/bench_serve.py                          # 16 clients x 200 requests per configuration
    python benchmarks/bench_serve.py --requests 400 --configs baseline batching_on
    unshare -rn sh -c 'ip link set lo up && exec python benchmarks/bench_serve.py --configs batching_on ray_1 \
        ray_2 --requests 1600 --out benchmarks/results/bench_serve_ray.json'   # Ray Serve replicas (the ray extra)

Ray's own processes listen on every interface (only its HTTP proxy takes serve.host), so the Ray configurations
run in a network namespace whose only interface is loopback (`unshare -rn`, as tests/test_serve_ray.py does).

Writes benchmarks/results/bench_serve.json. Each configuration is its own server process on 127.0.0.1 and a
free port, started, warmed up (one concurrent request per client, not timed, so model loading and first-call
costs are not measured), loaded, and stopped before the next starts:

- `baseline`: serve_baseline.py on the digits checkpoint (models/digits/checkpoint), the sampling of
  pipelines_yaml/digits.yaml (20 steps, 32x32, true CFG 6.0 against "", max_sequence_length 16);
- `batching_on`: `diffstage serve model=digits serve.max_batch=16 serve.max_wait_ms=20`;
- `batching_off`: `diffstage serve model=digits serve.max_batch=1`;
- `ray_1`, `ray_2`: batching_on's settings with serve.backend=ray and serve.replicas=1 or 2: replicas on a
  local Ray Serve (the ray extra), each with an equal share of the cores (torch threads to match), behind Ray
  Serve's HTTP proxy. Not run by default: `--configs ray_1 ray_2`.

The load: --clients closed-loop clients (threads; each sends its next request when the last one is answered),
sharing --requests requests `POST /v1/images/generations` (n=1, b64_json) whose prompts cycle over the ten digit
prompts, each with its own seed. A 429 is counted and retried after its Retry-After. Per configuration:
throughput (images/s over the loaded run), latency p50/p95/p99 (first send to final answer, retries included),
answers by status, lost requests (sent, no answer: must be 0), the digits classifier's accuracy on the images
returned (the right image, not just an image), the batch-size histogram (diffstage: its `diffstage_batch_size`
histogram from GET /metrics, after minus before the load; baseline: every call is one request) and the server's
RSS (its process and children, every --rss-interval s: peak, and the first 10% of the run against the last 10%,
to judge whether it stays flat). Ratios against the baseline, between batching on and off, and of 2 Ray
replicas against 1 close the file. With Ray the server's CPU time and RSS count Ray's own processes (its
controller, proxy and raylet run under the command), and the batch sizes are summed over the replicas (each GET
/metrics reaches one: it is repeated until every replica has answered, as X-Diffstage-Replica tells).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits" / "checkpoint"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = tuple(f"a handwritten digit {word}" for word in WORDS)  # pipelines_yaml/digits.yaml's examples
CONFIGS = ("baseline", "batching_on", "batching_off")
RAY_CONFIGS = {"ray_1": 1, "ray_2": 2}  # config -> replicas
BATCHING = ["serve.max_batch=16", "serve.max_wait_ms=20"]
DIFFSTAGE_SETTINGS = {"batching_on": BATCHING, "batching_off": ["serve.max_batch=1"],
                      **{config: [*BATCHING, "serve.backend=ray", f"serve.replicas={n}",
                                  "serve.ray_init={address: local}"] for config, n in RAY_CONFIGS.items()}}
REPLICA_HEADER = "x-diffstage-replica"
BATCH_METRIC = "diffstage_batch_size"
MAX_RETRY_AFTER_S = 10.0  # a Retry-After above this is waited as this: the run stays bounded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(config: str, port: int, diffstage: Path) -> list[str]:
    if config == "baseline":
        return [sys.executable, str(Path(__file__).with_name("serve_baseline.py")), "--checkpoint", str(DIGITS),
                "--port", str(port)]
    return [str(diffstage), "serve", "model=digits", "serve.host=127.0.0.1", f"serve.port={port}",
            *DIFFSTAGE_SETTINGS[config]]


# --- the server process and its memory ---------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc/*/stat: a server may run workers as child processes)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        parent_of[int(stat.parent.name)] = int(fields[1])
    family, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parent_of.items() if parent in frontier]
        family += frontier
    return family


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and its children: less sensitive than wall time to
    other work on a shared machine."""
    ticks = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return ticks / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """The summed VmRSS of a process and its children, every `interval` seconds, on a thread of its own."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            rss = sum(status_kib(p, "VmRSS") for p in descendants(self.pid)) * 1024
            self.samples.append((time.perf_counter() - start, rss))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict:
        mb = np.array([rss for _, rss in self.samples], dtype=float) / 2**20
        if len(mb) == 0:
            return {"samples": 0}
        tenth = max(1, len(mb) // 10)
        first, last = float(mb[:tenth].mean()), float(mb[-tenth:].mean())
        every = max(1, math.ceil(len(mb) / 60))  # at most 60 points in the file
        return {"samples": len(mb), "interval_s": self.interval, "peak_mb": round(float(mb.max()), 1),
                "first_10pct_mean_mb": round(first, 1), "last_10pct_mean_mb": round(last, 1),
                "last_over_first": round(last / first, 4), "trace_mb": [round(float(x), 1) for x in mb[::every]],
                "trace_every_s": round(self.interval * every, 2)}


class Server:
    """A server subprocess: started in its own session (so a Ctrl-C reaches it only through stop()), ready when
    GET /ready answers 200 (from each of its `replicas`), stopped with SIGINT (uvicorn's graceful shutdown; with
    Ray, the deployment deleted and Ray stopped), killed with its whole session if it does not exit."""

    def __init__(self, command: list[str], port: int, log: Path, replicas: int = 1):
        self.command, self.url, self.log, self.replicas = command, f"http://127.0.0.1:{port}", log, replicas
        self.process: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def start(self, timeout: float) -> float:
        start = time.perf_counter()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready: set = set()  # the replicas that answered /ready with 200
        while time.perf_counter() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[:2]} exited with {self.process.returncode} before it was ready:\n"
                                   + self.log_tail())
            try:
                answer = request("GET", self.url + "/ready", timeout=5)
            except OSError:
                answer = None  # not listening yet
            if answer is not None and answer.status == 200:
                ready.add(answer.headers.get(REPLICA_HEADER))
                if len(ready) >= self.replicas:
                    return time.perf_counter() - start
            time.sleep(0.25)
        raise RuntimeError(f"{self.command[:2]} not ready after {timeout:.0f} s:\n" + self.log_tail())

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            self.exit_code = None if self.process is None else self.process.returncode
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.exit_code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait(timeout)
        try:  # whatever it started and left behind (Ray's processes, were it killed): its session is its own
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


# --- one request -------------------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict  # names in lower case (HTTP names are case-insensitive; servers send either)
    body: bytes


def request(method: str, url: str, body: dict | None = None, timeout: float = 60.0) -> Answer:
    """One HTTP request; any status is an answer, OSError (refused, reset, timed out) is none."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Answer(response.status, lower_keys(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, lower_keys(error.headers), error.read())


def lower_keys(headers) -> dict:
    return {name.lower(): value for name, value in headers.items()}


@dataclass
class Outcome:
    digit: int
    seed: int
    status: int | None = None  # the final answer's; None: no answer (lost)
    latency_s: float | None = None
    statuses: list[int] = field(default_factory=list)  # every answer, 429s included
    image: np.ndarray | None = None
    error: str | None = None


def decode_image(body: bytes) -> np.ndarray:
    """The one PNG of an OpenAI images answer, as [H, W, 3] floats in [0, 1]."""
    from PIL import Image

    data = json.loads(body)["data"]
    if len(data) != 1:
        raise ValueError(f"{len(data)} images in the answer, 1 asked")
    png = base64.b64decode(data[0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0


def retry_after(value: str | None) -> float:
    """Retry-After in seconds (an HTTP date, which OpenAI's servers do not send, counts as 1 s)."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return 1.0


def generate(url: str, digit: int, seed: int, timeout: float, deadline: float) -> Outcome:
    """One image request, retried after each 429's Retry-After until `deadline`."""
    body = {"model": "digits", "prompt": PROMPTS[digit], "n": 1, "response_format": "b64_json", "seed": seed}
    outcome, start = Outcome(digit, seed), time.perf_counter()
    while True:
        try:
            answer = request("POST", url + "/v1/images/generations", body, timeout)
        except OSError as error:
            outcome.error = f"{type(error).__name__}: {error}"
            return outcome
        outcome.statuses.append(answer.status)
        if answer.status == 429:
            wait = min(retry_after(answer.headers.get("retry-after")), MAX_RETRY_AFTER_S)
            if time.perf_counter() + wait < deadline:
                time.sleep(wait)
                continue
        outcome.status, outcome.latency_s = answer.status, time.perf_counter() - start
        if 200 <= answer.status < 300:
            try:
                outcome.image = decode_image(answer.body)
            except (ValueError, KeyError, OSError) as error:
                outcome.error = f"undecodable answer: {error}"
        else:
            outcome.error = answer.body[:300].decode(errors="replace")
        return outcome


def load(url: str, jobs: list[tuple[int, int]], clients: int, timeout: float, time_limit: float) -> tuple[list, float]:
    """`clients` threads share `jobs` ((digit, seed) pairs), one request at a time each; none starts a new
    request after `time_limit` seconds. Returns the outcomes (None for jobs never sent) and the wall time."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    next_job, lock = iter(range(len(jobs))), threading.Lock()
    start = time.perf_counter()
    deadline = start + time_limit

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                index = next(next_job, None)
            if index is None:
                return
            outcomes[index] = Outcome(*jobs[index])  # sent, no answer yet: lost if its thread never returns
            outcomes[index] = generate(url, *jobs[index], timeout, deadline)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:  # bounded: a client ends by its deadline plus one request's timeout
        thread.join(max(0.0, deadline + timeout + MAX_RETRY_AFTER_S - time.perf_counter()))
    return outcomes, time.perf_counter() - start


# --- what the server reports -------------------------------------------------------------------------------

def histogram_buckets(metrics: str, name: str) -> tuple[dict[float, float], float, float] | None:
    """A Prometheus histogram's cumulative buckets {le: count}, its count and its sum, summed over its labels."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    found = False
    for line in metrics.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        metric = key.split("{", 1)[0]
        if metric == name + "_bucket":
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = buckets.get(float(le), 0.0) + float(value)
        elif metric == name + "_count":
            count += float(value)
        elif metric == name + "_sum":
            total += float(value)
        else:
            continue
        found = True
    return (buckets, count, total) if found else None


def batch_histogram(before: tuple | None, after: tuple | None) -> dict | None:
    """Batches by size range between two readings of the histogram (whole requests: a bucket (2, 4] holds
    batches of 3 or 4)."""
    if after is None:
        return None
    (b0, c0, s0), (b1, c1, s1) = before or ({}, 0.0, 0.0), after
    ranges, lower, below = {}, 0.0, 0.0
    for le in sorted(b1):
        cumulative = b1[le] - b0.get(le, 0.0)
        first, last = math.floor(lower) + 1, le
        name = f">{lower:g}" if math.isinf(le) else (f"{first}" if first >= last else f"{first}-{last:g}")
        if cumulative - below:
            ranges[name] = int(round(cumulative - below))
        lower, below = le, cumulative
    batches = c1 - c0
    return {"batches": int(batches), "requests_in_batches": int(round(s1 - s0)),
            "mean_batch_size": round((s1 - s0) / batches, 3) if batches else None, "by_size": ranges}


def read_metrics(url: str, replicas: int = 1, attempts: int = 50) -> tuple | None:
    """The batch histogram summed over the server's replicas: GET /metrics (which one replica answers) until
    each has answered once, or `attempts` GETs; None when a replica was never reached."""
    seen: dict = {}
    for _ in range(attempts):
        try:
            answer = request("GET", url + "/metrics", timeout=10)
        except OSError:
            return None
        if answer.status != 200:
            return None
        seen[answer.headers.get(REPLICA_HEADER)] = histogram_buckets(answer.body.decode(errors="replace"),
                                                                       BATCH_METRIC)
        if len(seen) >= replicas:
            return sum_histograms([h for h in seen.values() if h is not None])
    return None


def sum_histograms(readings: list[tuple]) -> tuple | None:
    if not readings:
        return None
    buckets: dict[float, float] = {}
    for reading in readings:
        for le, count in reading[0].items():
            buckets[le] = buckets.get(le, 0.0) + count
    return buckets, sum(r[1] for r in readings), sum(r[2] for r in readings)


def read_metrics_settled(url: str, images: float, timeout: float = 5.0, replicas: int = 1) -> tuple | None:
    """The batch histogram once it counts `images` images: a server may record a batch just after it answers,
    so a reading taken the moment the last answer arrives can miss the last batch."""
    deadline = time.perf_counter() + timeout
    reading = read_metrics(url, replicas)
    while reading is not None and reading[2] < images and time.perf_counter() < deadline:
        time.sleep(0.1)
        reading = read_metrics(url, replicas)
    return reading


def made_images(outcomes: list[Outcome | None]) -> int:
    return sum(o is not None and o.image is not None for o in outcomes)


# --- one configuration -------------------------------------------------------------------------------------

def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    p = np.percentile(np.array(latencies), [50, 95, 99])
    return {"p50": round(float(p[0]), 4), "p95": round(float(p[1]), 4), "p99": round(float(p[2]), 4),
            "mean": round(float(np.mean(latencies)), 4), "max": round(float(np.max(latencies)), 4)}


def count_answers(outcomes: list[Outcome | None]) -> dict:
    sent = [o for o in outcomes if o is not None]
    every = [s for o in sent for s in o.statuses]
    final = [o.status for o in sent if o.status is not None]
    return {"requests": len(outcomes), "sent": len(sent), "unsent": len(outcomes) - len(sent),
            "lost": sum(o.status is None for o in sent),
            "final_2xx": sum(200 <= s < 300 for s in final), "final_4xx": sum(400 <= s < 500 for s in final),
            "final_5xx": sum(s >= 500 for s in final),
            "answers_429": every.count(429), "answers_5xx": sum(s >= 500 for s in every),
            "requests_retried": sum(429 in o.statuses for o in sent),
            "undecodable": sum(o.status is not None and 200 <= o.status < 300 and o.image is None for o in sent),
            "errors": sorted({o.error for o in sent if o.error})[:5]}


def accuracy(outcomes: list[Outcome | None]) -> float | None:
    """The digits classifier's share of returned images that show the digit asked for."""
    made = [o for o in outcomes if o is not None and o.image is not None]
    if not made:
        return None
    from diffstage.models.digits.classifier import classify

    predicted = classify(np.stack([o.image for o in made]))
    return round(float(np.mean(predicted == np.array([o.digit for o in made]))), 4)


def agreement(outcomes: list[Outcome | None], reference: list[Outcome | None]) -> dict:
    """The images of two configurations for the same (prompt, seed), as 8-bit PNGs: how many are identical, and
    the largest difference in [0, 1] units (batching and another library round differently: not bit for bit)."""
    pairs = [(o.image, r.image) for o, r in zip(outcomes, reference)
             if o is not None and r is not None and o.image is not None and r.image is not None]
    diffs = [float(np.abs(a - b).max()) for a, b in pairs]
    return {"compared": len(pairs), "identical": sum(d == 0 for d in diffs),
            "max_abs_diff": round(max(diffs), 4) if diffs else None,
            "mean_abs_diff": round(float(np.mean([np.abs(a - b).mean() for a, b in pairs])), 6) if pairs else None}


def measure(config: str, args, log_dir: Path) -> tuple[dict, list]:
    port, replicas = free_port(), RAY_CONFIGS.get(config, 1)
    server = Server(server_command(config, port, args.diffstage), port, log_dir / f"{config}.log", replicas)
    display = " ".join(server.command).replace(str(ROOT) + "/", "")
    print(f"{config}: {display}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    try:
        ready_s = server.start(args.start_timeout)
        warmup = [(k % 10, args.seed_base - 1 - k) for k in range(args.warmup)]
        warm, _ = load(server.url, warmup, args.clients, args.request_timeout, args.time_limit)
        before = read_metrics_settled(server.url, made_images(warm), replicas=replicas)
        jobs = [(k % 10, args.seed_base + k) for k in range(args.requests)]
        cpu_before = cpu_seconds(server.process.pid)
        with RssSampler(server.process.pid, args.rss_interval) as rss:
            outcomes, wall = load(server.url, jobs, args.clients, args.request_timeout, args.time_limit)
        cpu = cpu_seconds(server.process.pid) - cpu_before
        after = read_metrics_settled(server.url, (before[2] if before else 0) + made_images(outcomes),
                                     replicas=replicas)
        hwm_mb = status_kib(server.process.pid, "VmHWM") / 1024
    finally:
        server.stop(90.0 if config in RAY_CONFIGS else 30.0)
    answers = count_answers(outcomes)
    made = answers["final_2xx"] - answers["undecodable"]
    latencies = [o.latency_s for o in outcomes if o is not None and o.status is not None and 200 <= o.status < 300]
    if config == "baseline":  # one pipeline call per request, behind the lock
        batches = {"batches": made, "requests_in_batches": made, "mean_batch_size": 1.0 if made else None,
                   "by_size": {"1": made} if made else {}}
    else:
        batches = batch_histogram(before, after)
    row = {"command": display.replace(str(port), "PORT"), "ready_s": round(ready_s, 2), "warmup_requests": args.warmup,
           "wall_s": round(wall, 3), "images": made, "images_per_s": round(made / wall, 4) if wall else None,
           "server_cpu_s_per_image": round(cpu / made, 4) if made else None,
           "latency_s": percentiles(latencies), "answers": answers, "accuracy": accuracy(outcomes),
           "batch_size": batches, "rss": {**rss.summary(), "server_process_peak_mb_since_start": round(hwm_mb, 1)},
           "server_exit_code": server.exit_code, "load_average_before": [round(x, 2) for x in load_before],
           "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    print(f"  {made} images in {wall:.1f} s: {row['images_per_s']} images/s, "
          f"{row['server_cpu_s_per_image']} CPU s/image, latency {row['latency_s']}, "
          f"lost {answers['lost']}, 429s {answers['answers_429']}, 5xx {answers['answers_5xx']}, "
          f"accuracy {row['accuracy']}, batches {batches}", file=sys.stderr, flush=True)
    return row, outcomes


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(results: dict) -> dict:
    """Throughput and p99 of batching on against the baseline (targets: >= 3x, p99 no worse) and against off."""
    def get(config: str, what: str):
        row = results.get(config)
        if not row:
            return None
        figures = {"throughput": row["images_per_s"], "cpu": row["server_cpu_s_per_image"],
                   "p99": row["latency_s"].get("p99")}
        return figures[what]

    out = {}
    for other in ("baseline", "batching_off"):
        out[f"throughput_batching_on_over_{other}"] = ratio(get("batching_on", "throughput"), get(other, "throughput"))
        out[f"p99_batching_on_over_{other}"] = ratio(get("batching_on", "p99"), get(other, "p99"))
    out["throughput_batching_off_over_baseline"] = ratio(get("batching_off", "throughput"),
                                                         get("baseline", "throughput"))
    out["p99_batching_off_over_baseline"] = ratio(get("batching_off", "p99"), get("baseline", "p99"))
    # CPU seconds per image, baseline over batching on: the throughput ratio as the server's own CPU time sees it
    out["cpu_per_image_baseline_over_batching_on"] = ratio(get("baseline", "cpu"), get("batching_on", "cpu"))
    on_vs_base, p99_vs_base = out["throughput_batching_on_over_baseline"], out["p99_batching_on_over_baseline"]
    out["target_throughput_3x_met"] = None if on_vs_base is None else on_vs_base >= 3.0
    out["target_p99_no_worse_met"] = None if p99_vs_base is None else p99_vs_base <= 1.0
    # Ray Serve: 2 replicas against 1 on the same cores, and 1 replica against the same server without Ray
    for what in ("throughput", "p99", "cpu"):
        out[f"{what}_ray_2_over_ray_1"] = ratio(get("ray_2", what), get("ray_1", what))
        out[f"{what}_ray_1_over_batching_on"] = ratio(get("ray_1", what), get("batching_on", what))
    rows = [r for r in results.values() if r]
    out["lost_requests"] = sum(r["answers"]["lost"] + r["answers"]["unsent"] for r in rows)
    out["answers_5xx"] = sum(r["answers"]["answers_5xx"] for r in rows)
    return out


def machine() -> dict:
    import diffusers
    import torch

    from diffstage.hardware import cpu_info

    return {**cpu_info(), "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "device": "cpu"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed requests first (default: --clients)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *RAY_CONFIGS])
    parser.add_argument("--diffstage", type=Path, default=Path(sys.executable).with_name("diffstage"),
                        help="the diffstage command (default: the one beside this Python)")
    parser.add_argument("--seed-base", type=int, default=30000, help="first seed of the timed requests")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds one HTTP request may take")
    parser.add_argument("--time-limit", type=float, default=1200.0, help="seconds of load per configuration")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    parser.add_argument("--rss-interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_serve.json")
    args = parser.parse_args(argv)
    args.warmup = args.clients if args.warmup is None else args.warmup

    results: dict = {}
    outcomes: dict[str, list] = {}
    report = {"benchmark": "diffstage serve (dynamic batching on / off; 1 or 2 replicas on Ray Serve) beside a "
                           "FastAPI app with one Diffusers FluxPipeline behind a lock; digits, closed-loop clients "
                           "on 127.0.0.1",
              "machine": machine(),
              "settings": {"model": "digits", "clients": args.clients, "requests": args.requests,
                           "warmup_requests": args.warmup, "n": 1, "response_format": "b64_json",
                           "prompts": list(PROMPTS), "seeds": f"{args.seed_base} + request index",
                           "sampling": "pipelines_yaml/digits.yaml: 20 steps, 32x32, guidance_scale 0, "
                                       "true_cfg_scale 6.0, negative_prompt '', max_sequence_length 16",
                           "latency": "first send to final answer, 429 retries included"},
              "results": results, "ratios": {}}

    def write() -> None:  # after each configuration, so a failure later keeps what was measured
        report["ratios"] = ratios(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as logs:
        for config in args.configs:
            results[config], outcomes[config] = measure(config, args, Path(logs))
            if config != "baseline" and "baseline" in outcomes:
                results[config]["images_vs_baseline"] = agreement(outcomes[config], outcomes["baseline"])
            write()
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()

"""A real diffstage server for tests: uvicorn on 127.0.0.1 (a free port), in a thread of the test process,
stopped (gracefully, bounded in time) when the block ends."""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import numpy as np


@contextmanager
def running_server(overrides=(), timeout_s: float = 120, **serve):
    """Yields (base_url, state) of a server over the run config `overrides` with serve settings `serve`."""
    import uvicorn

    from diffstage.builder import compose_config
    from diffstage.run_config import parse_run_config
    from diffstage.server import ServerState, create_app, serve_settings

    # the server's log lines stay out of the root logger, whose handlers an earlier in-process Hydra app may have
    # pointed at a stream pytest has closed since (tests/test_serve.py checks the lines of `diffstage serve`)
    quiet = [logging.getLogger(name) for name in ("diffstage.server", "uvicorn", "uvicorn.error")]
    saved = [logger.propagate for logger in quiet]
    for logger in quiet:
        logger.propagate = False
    server = thread = None
    try:
        serve = {"max_wait_ms": 5, "shutdown_grace_s": 10, **serve}
        state = ServerState(parse_run_config(compose_config(list(overrides))), serve_settings(serve))
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_config=None, access_log=False,
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        while not state.ready()[0]:  # the models load in the background (serve.preload)
            assert state.preload_error is None, state.preload_error
            assert time.monotonic() < deadline, "the test server's models did not load"
            time.sleep(0.05)
        yield url, state
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(30)
        for logger, propagate in zip(quiet, saved):
            logger.propagate = propagate


def client(url: str, api_key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def png_pixels(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def b64_pixels(text: str) -> np.ndarray:
    import base64

    return png_pixels(base64.b64decode(text))


def http_get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    """Status and body of a GET (urllib: no client package needed)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metric(url: str, name: str, **labels) -> float:
    """A sample's value from the server's /metrics (0 when absent)."""
    _, text = http_get(f"{url}/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + ("{" if labels else " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server that cannot be given port 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float, alive=lambda: True) -> None:
    """Until GET /ready answers 200 (the server up, its models loaded), while `alive()`; AssertionError past
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            if http_get(f"{url}/ready")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} was not ready within {timeout_s:g} s" + ("" if alive() else " (it exited)"))

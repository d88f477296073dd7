"""Pipelines share a loaded VAE (the session's module cache), and a video VAE keeps its decode state on the module
(its causal convolutions' cache): two decodes on one VAE at once would mix their frames, so they take turns."""
import threading
import time

import pytest

from diffstage import build_pipeline

FAST = dict(num_inference_steps=2, height=32, width=32, num_frames=5, output_type="np")


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from diffstage.models.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "ckpt")


def test_decodes_on_one_shared_vae_take_turns(tiny_wan):
    a = build_pipeline("wan_t2v", model_path=tiny_wan, overrides=["reuse.enabled=false"])
    b = build_pipeline("wan_t2v", model_path=tiny_wan, overrides=["reuse.enabled=false", "sampling.guidance_scale=3"])
    vae = a.modules["vae"]
    assert b.modules["vae"] is vae  # one module, as the session's cache shares it
    inside, most, original = [0], [0], type(vae).decode

    def slow_decode(*args, **kwargs):  # holds the decode open long enough for the other thread to try
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.3)
        try:
            return original(vae, *args, **kwargs)
        finally:
            inside[0] -= 1

    vae.decode = slow_decode
    try:
        outs = {}
        threads = [threading.Thread(target=lambda p=p, k=k: outs.__setitem__(k, p("a fox", seed=0, **FAST)))
                   for k, p in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        del vae.decode
    assert set(outs) == {"a", "b"} and most[0] == 1
    solo = a("a fox", seed=0, **FAST).images
    assert abs(outs["a"].images - solo).max() <= 1e-6  # same process and layout

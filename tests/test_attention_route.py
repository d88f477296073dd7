"""A stock transformer's attention run by diffstage's attention layer through its declaration: the run's
attention backend computes it, and a processor that bypasses torch's scaled_dot_product_attention is caught
under sequence parallelism instead of silently attending over one rank's tokens."""
import re

import numpy as np
import pytest
import torch

from diffstage import DiffstageError, build_pipeline
from diffstage.attention import backends
from diffstage.attention.backends import reference
from diffstage.attention.route import install_attention_route, routed_attention
from diffstage.distributed import ParallelState

REQUEST = dict(prompt="a red fox", negative_prompt="blurry", guidance_scale=4.0, seed=3, num_inference_steps=2,
               height=32, width=48, max_sequence_length=16, num_frames=5, output_type="np")


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from diffstage.models.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("ckpt") / "tiny-wan")


def test_the_run_backend_computes_a_stock_transformers_attention(tiny_wan, monkeypatch):
    calls = []

    def counting(q, k, v, mask=None):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return reference(q, k, v, mask)

    monkeypatch.setitem(backends._BACKENDS, "counting_for_test", counting)  # gone after the test
    plain = build_pipeline("wan_t2v", model_path=tiny_wan, overrides=["reuse.enabled=false"])(**REQUEST).images
    assert not calls  # sdpa: the processors run as they are
    routed = build_pipeline("wan_t2v", model_path=tiny_wan,
                            overrides=["reuse.enabled=false", "attention.backend=counting_for_test"])(**REQUEST).images
    # 2 steps x 2 branches (batched: one call) x 2 blocks x (self-attention + cross-attention to the text)
    assert len(calls) == 2 * 2 * 2, calls
    assert {k for _, k in calls} == {(2, 12, 2, 12), (2, 16, 2, 12)}  # 12 video tokens, 16 text tokens
    diff = float(np.abs(routed - plain).max())
    print(f"wan_t2v attention=reference-backed vs sdpa: max|Δ| = {diff:.3g}")
    assert diff <= 1e-5


class _Manual(torch.nn.Module):
    """A module with a Diffusers attention module whose processor computes attention by hand (AttnProcessor:
    baddbmm and softmax, no scaled_dot_product_attention)."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention, AttnProcessor

        self.attn = Attention(query_dim=8, heads=2, dim_head=4, processor=AttnProcessor())

    def forward(self, x):
        return self.attn(x)


def test_attention_that_bypasses_sdpa_is_refused_under_sequence_parallelism():
    module = _Manual()
    install_attention_route(module, None)
    x = torch.randn(1, 3, 8)
    with routed_attention(module, "sdpa"):
        module(x)  # one process: nothing to split, the processor runs as it is
    state = ParallelState(ulysses=2, rank=0, world_size=2, ranks={"sequence": [0, 1], "ulysses": [0, 1]})
    with routed_attention(module, "sdpa", state), pytest.raises(DiffstageError, match=re.escape(
            "sequence parallelism: attention module 'attn' (Attention, processor AttnProcessor) computed its "
            "attention without torch's scaled_dot_product_attention, so its keys were not exchanged between the "
            "ranks; use a processor that calls it, or run with parallel.cfg only")):
        module(x)


def test_cross_attention_is_local_by_default_and_patterns_override():
    from diffusers.models.attention_processor import Attention

    module = torch.nn.Module()
    module.blocks = torch.nn.ModuleList([torch.nn.Module()])
    module.blocks[0].attn1 = Attention(query_dim=8, heads=2, dim_head=4)
    module.blocks[0].attn2 = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    slots = install_attention_route(module, None)
    assert {p: s.local for p, s in slots.items()} == {"blocks.0.attn1": False, "blocks.0.attn2": True}
    slots = install_attention_route(module, ["blocks.*.attn1"])
    assert {p: s.local for p, s in slots.items()} == {"blocks.0.attn1": True, "blocks.0.attn2": False}

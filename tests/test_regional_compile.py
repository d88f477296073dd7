"""runtime.compile on a stock transformer: its declared repeated blocks compiled one at a time, the output
that of the eager model."""
import numpy as np
import pytest

from diffstage import build_pipeline

REQUEST = dict(prompt="a red fox", negative_prompt="blurry", guidance_scale=4.0, seed=3, num_inference_steps=2,
               height=32, width=48, max_sequence_length=16, num_frames=5, output_type="np")


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from diffstage.models.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("ckpt") / "tiny-wan")


def compiled(pipe) -> list[bool]:
    return [getattr(block, "_compiled_call_impl", None) is not None for block in pipe.modules["transformer"].blocks]


def test_compile_true_compiles_each_declared_block(tiny_wan):
    from diffstage import Session

    eager = build_pipeline("wan_t2v", model_path=tiny_wan, session=Session(), overrides=["reuse.enabled=false"])
    assert compiled(eager) == [False, False]
    pipe = build_pipeline("wan_t2v", model_path=tiny_wan, session=Session(),
                          overrides=["reuse.enabled=false", "runtime.compile=true"])
    assert compiled(pipe) == [True, True]
    diff = float(np.abs(pipe(**REQUEST).images - eager(**REQUEST).images).max())
    print(f"wan_t2v runtime.compile=true vs eager: max|Δ| = {diff:.3g}")
    assert diff <= 1e-5


def test_compile_auto_leaves_a_small_model_eager(tiny_wan):
    from diffstage import Session

    pipe = build_pipeline("wan_t2v", model_path=tiny_wan, session=Session(),
                          overrides=["reuse.enabled=false", "runtime.compile=auto"])
    assert compiled(pipe) == [False, False]

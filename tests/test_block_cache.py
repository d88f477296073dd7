"""Step caches on stock Diffusers transformers, from the model YAML's `acceleration:` declaration of their blocks:
exact at threshold 0, skipping (and not running the skipped blocks) at a large threshold, the declaration checked
against the loaded transformer with file:line, and pipelines sharing one transformer unaffected by each other's cache."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, line_of
from diffstage import DiffstageError, build_pipeline

WAN_SMALL = dict(height=32, width=48, num_frames=5, max_sequence_length=16, guidance_scale=4.0)
FAMILIES = {  # model: (request, how many transformer calls a step makes, the Diffusers block class)
    "wan_t2v": (dict(WAN_SMALL, negative_prompt="blurry"), 1, "WanTransformerBlock"),  # CFG batched: one call
    "qwen_image": (dict(height=32, width=48, negative_prompt="blurry", true_cfg_scale=4.0), 2,
                   "QwenImageTransformerBlock"),  # CFG in two calls
    "qwen_image_edit": (dict(height=32, width=48, negative_prompt="blurry", true_cfg_scale=4.0,
                             image=Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8))),
                        2, "QwenImageTransformerBlock"),  # the input image's latents join the sequence
    "pixart_sigma": (dict(height=32, width=48, negative_prompt="blurry", guidance_scale=4.0), 1,
                     "BasicTransformerBlock"),
}
STEPS = 5
# max |Δ| of the decoded output ([0, 1]) with 3 of 5 steps from the cache; measured 0.046, 0.0034, 0.0092, 0.0013
SKIP_TOL = {"wan_t2v": 0.1, "qwen_image": 0.01, "qwen_image_edit": 0.03, "pixart_sigma": 0.01}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from diffstage.models.pixart.tiny import build_tiny_pixart
    from diffstage.models.qwen_image.tiny import build_tiny_qwen_image, build_tiny_qwen_image_edit
    from diffstage.models.wan.tiny import build_tiny_wan

    root = tmp_path_factory.mktemp("ckpt")
    return {"wan_t2v": build_tiny_wan(root / "wan"), "qwen_image": build_tiny_qwen_image(root / "qwen"),
            "qwen_image_edit": build_tiny_qwen_image_edit(root / "qwen-edit"),
            "pixart_sigma": build_tiny_pixart(root / "pixart")}


def output(out):
    return np.asarray(out.frames if out.frames is not None else out.images, dtype=np.float64)


def cache_stats(out):
    return next(r["step_cache"] for r in out.reports.values() if r and "step_cache" in r)


def build(model, ckpt, overrides=()):
    return build_pipeline(model, model_path=ckpt, overrides=["reuse.enabled=false", *overrides])


def run(pipe, model):
    return pipe("a red fox in the snow", seed=3, num_inference_steps=STEPS, output_type="np", **FAMILIES[model][0])


def generate(model, ckpt, overrides=()):
    return run(build(model, ckpt, overrides), model)


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_threshold_0_is_the_uncached_output(checkpoints, model):
    plain = output(generate(model, checkpoints[model]))
    out = generate(model, checkpoints[model], ["cache=first_block", "cache.threshold=0"])
    diff = float(np.abs(output(out) - plain).max())
    print(f"{model}: threshold 0, max|Δ| vs uncached = {diff:.3g}, {cache_stats(out)}")
    assert diff == 0.0
    calls = STEPS * FAMILIES[model][1]
    assert cache_stats(out) | {"threshold": 0} == {"kind": "first_block", "threshold": 0, "computed": calls,
                                                   "cached": 0}


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_a_large_threshold_skips_the_remaining_blocks(checkpoints, model, monkeypatch):
    """threshold 100, warmup 1, final 1: the steps between the first and the last take the cache; on those the
    blocks after the first do not run (counted on the Diffusers block class), and the output stays close."""
    plain = output(generate(model, checkpoints[model]))
    pipe = build(model, checkpoints[model], ["cache=first_block", "cache.threshold=100", "cache.warmup=1",
                                             "cache.final=1"])
    cls = next(type(m) for m in pipe.modules["transformer"].modules() if type(m).__name__ == FAMILIES[model][2])
    runs = []
    original = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: runs.append(1) or original(self, *a, **k))
    out = run(pipe, model)
    stats, ours = cache_stats(out), output(out)
    calls = STEPS * FAMILIES[model][1]
    diff = float(np.abs(ours - plain).max())
    print(f"{model}: threshold 100, {stats}, max|Δ| vs uncached = {diff:.3g}")
    assert stats["cached"] == (STEPS - 2) * FAMILIES[model][1] and stats["computed"] == calls - stats["cached"]
    blocks = 2  # the tiny checkpoints' layers: the first runs on every call, the second only on computed ones
    assert len(runs) == calls + stats["computed"] * (blocks - 1)
    assert np.isfinite(ours).all() and 0 < diff <= SKIP_TOL[model]


def variant(tmp_path, model, text, name="model.yaml"):
    path = tmp_path / name
    path.write_text(f"extends: {REPO / 'pipelines_yaml' / (model + '.yaml')}\n{text}")
    return path


def test_a_block_list_the_transformer_lacks_is_an_error_with_file_and_line(checkpoints, tmp_path):
    yaml = variant(tmp_path, "wan_t2v", "acceleration:\n  transformer:\n    blocks: [blokcs]\n")
    with pytest.raises(DiffstageError) as e:
        build_pipeline(yaml, model_path=checkpoints["wan_t2v"], overrides=["cache=first_block"])
    assert str(e.value) == (f"{yaml}:{line_of(yaml, 'blocks:')}: acceleration.transformer.blocks: "
                            "WanTransformer3DModel has no module list 'blokcs' (did you mean 'blocks'?)")


def test_a_hidden_state_argument_the_block_does_not_take_is_an_error(checkpoints, tmp_path):
    yaml = variant(tmp_path, "wan_t2v", "acceleration:\n  transformer:\n    residual:\n      input: latents\n"
                                        "      returns: latents\n")
    with pytest.raises(DiffstageError) as e:
        build_pipeline(yaml, model_path=checkpoints["wan_t2v"])
    assert str(e.value) == (f"{yaml}:{line_of(yaml, 'input:')}: acceleration.transformer.residual.input: "
                            "WanTransformerBlock.forward takes no argument 'latents' (it takes hidden_states, "
                            "encoder_hidden_states, temb, rotary_emb)")


def test_a_declaration_for_a_module_the_model_lacks_is_an_error(tmp_path):
    from diffstage import SpecError, check_model

    yaml = variant(tmp_path, "wan_t2v", "acceleration:\n  transformr:\n    blocks: [blocks]\n")
    with pytest.raises(SpecError) as e:
        check_model(yaml)
    assert f"{yaml}:{line_of(yaml, 'acceleration:')}" in str(e.value)
    assert "acceleration names 'transformr', which is not one of the model's modules" in str(e.value)


def test_a_stock_transformer_without_a_declaration_is_refused_with_how_to_declare(checkpoints, tmp_path):
    text = (REPO / "pipelines_yaml" / "wan_t2v.yaml").read_text()
    head, rest = text.split("acceleration:")
    yaml = tmp_path / "model.yaml"
    yaml.write_text(head + rest[rest.index("\nrequest_fields:"):])
    with pytest.raises(DiffstageError) as e:
        build_pipeline(yaml, model_path=checkpoints["wan_t2v"], overrides=["cache=first_block"])
    assert str(e.value) == (
        f"{yaml}:{line_of(yaml, 'DenoisingStage')}: stages[4] DenoisingStage: cache=first_block: "
        "WanTransformer3DModel does not support step caches (diffstage's native transformers take a `step_cache` "
        "argument; for a stock transformer, declare its blocks and residual stream under `acceleration.<module>` "
        "in the model YAML for cache=first_block, and a `probe` for cache=teacache: see the README's \"Adding a "
        "model\"; a model without one chain of repeated blocks, such as a UNet, cannot take them); use cache=none")


def test_pipelines_sharing_a_transformer_do_not_share_a_cache(checkpoints):
    """One pipeline with a skipping cache, one without, on the same loaded transformer, run at once in two
    threads (a step hook makes them take turns every step): each gives what it gives alone."""
    ckpt = checkpoints["wan_t2v"]
    cached = build("wan_t2v", ckpt, ["cache=first_block", "cache.threshold=100"])
    plain = build("wan_t2v", ckpt)
    assert cached.modules["transformer"] is plain.modules["transformer"]
    # latents: this test is about the transformer (tests/test_shared_vae.py is about the VAE they also share)
    kw = dict(num_inference_steps=STEPS, output_type="latent", **FAMILIES["wan_t2v"][0])
    alone = [output(p("a red fox", seed=1, **kw)) for p in (cached, plain)]
    turns = threading.Barrier(2, timeout=60)

    def take_turns(*_):  # a step hook: returns None, so the prediction stays as it is
        turns.wait()

    for pipe in (cached, plain):
        pipe.stages[4].add_step_hook(take_turns)
    with ThreadPoolExecutor(2) as pool:
        together = [f.result() for f in [pool.submit(p, "a red fox", seed=1, **kw) for p in (cached, plain)]]
    assert cache_stats(together[0])["cached"] > 0
    assert [float(np.abs(output(t) - a).max()) for t, a in zip(together, alone)] == [0.0, 0.0]
    assert float(np.abs(alone[0] - alone[1]).max()) > 0  # the cache did change the cached pipeline's output


def test_a_return_shape_unlike_the_declaration_names_the_declaration(checkpoints, tmp_path):
    """What a block returns is only seen on a call: the first cached call names the declaration's file:line."""
    yaml = variant(tmp_path, "qwen_image", "acceleration:\n  transformer:\n    residual:\n      returns: hidden_states\n")
    pipe = build(yaml, checkpoints["qwen_image"], ["cache=first_block"])
    with pytest.raises(DiffstageError) as e:
        run(pipe, "qwen_image")
    assert f"{yaml}:{line_of(yaml, 'returns:')}: acceleration.transformer.residual.returns: QwenImageTransformerBlock " \
           "returned a tuple of 2, but the declaration says a single tensor (hidden_states)" in str(e.value)


def test_without_blocks_a_class_with_no_repeated_blocks_is_told_to_declare_them(checkpoints, tmp_path):
    yaml = variant(tmp_path, "pixart_sigma", "acceleration:\n  transformer:\n    blocks: null\n")
    with pytest.raises(DiffstageError) as e:
        build(yaml, checkpoints["pixart_sigma"])
    assert str(e.value).startswith(f"{yaml}:{line_of(yaml, 'transformer:')}: acceleration.transformer: declare "
                                   "`blocks`: PixArtTransformer2DModel declares no _repeated_blocks to find them by; "
                                   "its module lists (transformer_blocks")


def test_blocks_declared_out_of_the_forward_order_are_named_on_the_first_cached_call(checkpoints, tmp_path):
    """One list named twice: the declared order says block 2 comes after block 1, the forward goes back to 0."""
    yaml = variant(tmp_path, "wan_t2v", "acceleration:\n  transformer:\n    blocks: [blocks, blocks]\n")
    pipe = build(yaml, checkpoints["wan_t2v"], ["cache=first_block"])
    with pytest.raises(DiffstageError) as e:
        run(pipe, "wan_t2v")
    assert f"{yaml}:{line_of(yaml, 'blocks:')}: acceleration.transformer.blocks: block 2 of the declared lists ran " \
           "when block 0 was next: declare `blocks` in the order the forward runs them, each once a call" \
           in str(e.value)


@pytest.mark.parametrize("residual, message", [
    ("{input: hidden states, returns: hidden_states}", "'hidden states' is not an argument name"),
    ("{input: hidden_states, returns: [encoder_hidden_states]}",
     "returns must name the input 'hidden_states' once, got ['encoder_hidden_states']"),
    ("{input: hidden_states, returns: [hidden_states, hidden_states]}",
     "returns must name the input 'hidden_states' once, got ['hidden_states', 'hidden_states']"),
])
def test_a_residual_declaration_that_cannot_be_right_is_a_spec_problem(tmp_path, residual, message):
    from diffstage import SpecError, check_model

    yaml = variant(tmp_path, "wan_t2v", f"acceleration:\n  transformer:\n    residual: {residual}\n")
    with pytest.raises(SpecError) as e:
        check_model(yaml)
    assert f"{yaml}:{line_of(yaml, 'residual:')}: acceleration.transformer.residual" in str(e.value)
    assert message in str(e.value)

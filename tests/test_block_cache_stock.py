"""Both step caches on every shipped family's stock Diffusers transformer, from its model YAML's `acceleration:`
declaration (blocks, residual, probe): exact at threshold 0, skipping whole calls with cache=teacache at a
positive threshold (the skipped calls run no block to its end) and staying close, SD3's last block (no text
output) handed through on a skipped call, and a wrong probe named with file:line."""
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, line_of
from test_block_cache import FAMILIES as FIRST_BLOCK_FAMILIES, build, cache_stats, output
from diffstage import DiffstageError

STEPS = 5
FAMILIES = {"sd3": (dict(height=32, width=48, guidance_scale=4.0), 1, "JointTransformerBlock"),  # CFG batched
            **FIRST_BLOCK_FAMILIES}  # model: (request, transformer calls per step, the Diffusers block class)
BLOCKS = 2  # every checkpoint here has two blocks
# cache=teacache, threshold 100 (warmup 1, final 1: the 3 middle steps from the cache): max |Δ| of the decoded
# output ([0, 1]) against uncached; measured 0.013, 0.0020, 0.0047, 0.010, 0.036 (in FAMILIES' order), and 0.0084
# for SD3 with cache=first_block
SKIP_TOL = {"sd3": 0.03, "pixart_sigma": 0.01, "qwen_image": 0.01, "qwen_image_edit": 0.03, "wan_t2v": 0.1}


def sd3_with_two_blocks(root):
    """The tiny SD3 checkpoint with a second block, so that a skipped call hands through the last block (which
    returns no text: context_pre_only) while the first one ran."""
    from diffusers import SD3Transformer2DModel

    from diffstage.models.sd3.tiny import build_tiny_sd3

    ckpt = root / "sd3-2"
    shutil.copytree(build_tiny_sd3(root / "sd3"), ckpt)
    config = dict(SD3Transformer2DModel.load_config(ckpt / "transformer"), num_layers=2)
    torch.manual_seed(0)
    shutil.rmtree(ckpt / "transformer")
    SD3Transformer2DModel.from_config(config).save_pretrained(ckpt / "transformer", safe_serialization=True)
    return ckpt


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from diffstage.models.pixart.tiny import build_tiny_pixart
    from diffstage.models.qwen_image.tiny import build_tiny_qwen_image, build_tiny_qwen_image_edit
    from diffstage.models.wan.tiny import build_tiny_wan

    root = tmp_path_factory.mktemp("ckpt")
    return {"sd3": sd3_with_two_blocks(root), "pixart_sigma": build_tiny_pixart(root / "pixart"),
            "qwen_image": build_tiny_qwen_image(root / "qwen"),
            "qwen_image_edit": build_tiny_qwen_image_edit(root / "qwen-edit"), "wan_t2v": build_tiny_wan(root / "wan")}


@pytest.fixture(scope="module")
def uncached(checkpoints):
    made = {}

    def get(model):
        if model not in made:
            made[model] = output(generate(model, checkpoints[model]))
        return made[model]

    return get


def run(pipe, model):
    return pipe("a red fox in the snow", seed=3, num_inference_steps=STEPS, output_type="np", **FAMILIES[model][0])


def generate(model, ckpt, overrides=()):
    return run(build(model, ckpt, overrides), model)


@pytest.mark.parametrize("kind", ["first_block", "teacache"])
@pytest.mark.parametrize("model", list(FAMILIES))
def test_threshold_0_is_bit_identical_to_uncached(checkpoints, uncached, model, kind):
    out = generate(model, checkpoints[model], [f"cache={kind}", "cache.threshold=0"])
    calls = STEPS * FAMILIES[model][1]
    assert np.array_equal(output(out), uncached(model))
    assert cache_stats(out) == {"kind": kind, "threshold": 0, "computed": calls, "cached": 0}


def count_completed_blocks(pipe, model, monkeypatch) -> list:
    """Patches the Diffusers block class: one entry per block forward that returned (a skipped call's first block
    may start, up to its probe, and stop there)."""
    cls = next(type(m) for m in pipe.modules["transformer"].modules() if type(m).__name__ == FAMILIES[model][2])
    done, original = [], cls.forward

    def counted(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        done.append(1)
        return out

    monkeypatch.setattr(cls, "forward", counted)
    return done


@pytest.mark.parametrize("model", list(FAMILIES))
def test_teacache_with_a_positive_threshold_skips_whole_calls(checkpoints, uncached, model, monkeypatch):
    """threshold 100 with no rescaling, warmup 1, final 1: the middle steps take the cache and run no block to its
    end; the output stays close (SKIP_TOL) but is not the uncached one."""
    pipe = build(model, checkpoints[model], ["cache=teacache", "cache.threshold=100", "cache.coefficients=[1,0]",
                                             "cache.warmup=1", "cache.final=1"])
    plain = uncached(model)  # before the block class is patched to count
    done = count_completed_blocks(pipe, model, monkeypatch)
    out = run(pipe, model)
    stats, ours = cache_stats(out), output(out)
    per_step = FAMILIES[model][1]
    diff = float(np.abs(ours - plain).max())
    print(f"{model}: teacache threshold 100, {stats}, max|Δ| vs uncached = {diff:.3g}")
    assert stats == {"kind": "teacache", "threshold": 100, "computed": 2 * per_step, "cached": (STEPS - 2) * per_step}
    assert len(done) == stats["computed"] * BLOCKS
    assert np.isfinite(ours).all() and 0 < diff <= SKIP_TOL[model]


def test_teacache_takes_the_model_yaml_defaults_and_a_small_threshold_skips_less(checkpoints):
    """The YAML's teacache section applies (Wan: the TeaCache authors' polynomial); a threshold under the first
    rescaled change computes every call, one over it skips some."""
    low = cache_stats(generate("qwen_image", checkpoints["qwen_image"], ["cache=teacache", "cache.threshold=0.01"]))
    high = cache_stats(generate("qwen_image", checkpoints["qwen_image"], ["cache=teacache"]))
    assert low["cached"] == 0 and high["threshold"] == 0.2 and 0 < high["cached"] < (STEPS - 2) * 2


def test_first_block_on_sd3_hands_the_last_block_through(checkpoints, uncached, monkeypatch):
    """SD3's last block returns (None, hidden_states): a skipped call runs the first block, hands the last one its
    inputs through and adds the cached residual; the output stays close."""
    pipe = build("sd3", checkpoints["sd3"], ["cache=first_block", "cache.threshold=100"])
    plain = uncached("sd3")
    done = count_completed_blocks(pipe, "sd3", monkeypatch)
    out = run(pipe, "sd3")
    stats = cache_stats(out)
    diff = float(np.abs(output(out) - plain).max())
    print(f"sd3: first_block threshold 100, {stats}, max|Δ| vs uncached = {diff:.3g}")
    assert stats["cached"] == STEPS - 2 and len(done) == STEPS + stats["computed"]
    assert 0 < diff <= SKIP_TOL["sd3"]


def variant(tmp_path, model, text):
    path = tmp_path / "model.yaml"
    path.write_text(f"extends: {REPO / 'pipelines_yaml' / (model + '.yaml')}\n{text}")
    return path


def test_a_probe_module_the_transformer_lacks_is_an_error_with_file_and_line(checkpoints, tmp_path):
    yaml = variant(tmp_path, "sd3", "acceleration:\n  transformer:\n    probe: transformer_blocks.0.norm2x\n")
    with pytest.raises(DiffstageError) as e:
        build(yaml, checkpoints["sd3"])
    assert str(e.value) == (f"{yaml}:{line_of(yaml, 'probe:')}: acceleration.transformer.probe: SD3Transformer2DModel "
                            "has no module 'transformer_blocks.0.norm2x' (did you mean 'transformer_blocks.0.norm2'?)")


def test_a_probe_path_with_nothing_close_lists_what_is_there(checkpoints, tmp_path):
    yaml = variant(tmp_path, "wan_t2v", "acceleration:\n  transformer:\n    probe: condition_embedder.q\n")
    with pytest.raises(DiffstageError) as e:
        build(yaml, checkpoints["wan_t2v"])
    assert str(e.value) == (f"{yaml}:{line_of(yaml, 'probe:')}: acceleration.transformer.probe: WanTransformer3DModel "
                            "has no module 'condition_embedder.q' (condition_embedder holds: timesteps_proj, "
                            "time_embedder, act_fn, time_proj, text_embedder)")


def test_a_probe_input_the_module_does_not_take_is_an_error(checkpoints, tmp_path):
    yaml = variant(tmp_path, "pixart_sigma", "acceleration:\n  transformer:\n    probe:\n"
                                             "      module: transformer_blocks.0.attn1\n      input: latents\n")
    with pytest.raises(DiffstageError) as e:
        build(yaml, checkpoints["pixart_sigma"])
    assert str(e.value) == (f"{yaml}:{line_of(yaml, 'input:')}: acceleration.transformer.probe.input: "
                            "Attention.forward takes no argument 'latents' (it takes hidden_states, "
                            "encoder_hidden_states, attention_mask)")


def test_a_probe_that_runs_after_the_first_block_is_named_on_the_first_cached_call(checkpoints, tmp_path):
    yaml = variant(tmp_path, "wan_t2v", "acceleration:\n  transformer:\n    probe: norm_out\n")
    pipe = build(yaml, checkpoints["wan_t2v"], ["cache=teacache"])
    with pytest.raises(DiffstageError) as e:
        run(pipe, "wan_t2v")
    assert str(e.value) == (f"{yaml}:{line_of(yaml, 'probe:')}: acceleration.transformer.probe: the probe did not run "
                            "before the first declared block returned: name a module that runs before the blocks or "
                            "inside the first one")


def test_a_probe_that_gives_no_tensor_is_named(checkpoints, tmp_path):
    """An argument Diffusers passes as None: Wan's self-attention takes no `encoder_hidden_states`."""
    yaml = variant(tmp_path, "wan_t2v", "acceleration:\n  transformer:\n    probe: {module: blocks.0.attn1, "
                                        "input: encoder_hidden_states}\n")
    pipe = build(yaml, checkpoints["wan_t2v"], ["cache=teacache"])
    with pytest.raises(DiffstageError) as e:
        run(pipe, "wan_t2v")
    assert str(e.value) == (f"{yaml}:{line_of(yaml, 'probe:')}: acceleration.transformer.probe: the probe gave "
                            "NoneType, not a tensor to measure")


def test_teacache_without_a_probe_is_refused_with_how_to_declare_one(checkpoints, tmp_path):
    yaml = variant(tmp_path, "pixart_sigma", "acceleration:\n  transformer:\n    probe: null\n")
    with pytest.raises(DiffstageError) as e:
        build(yaml, checkpoints["pixart_sigma"], ["cache=teacache"])
    assert str(e.value).endswith(
        "DenoisingStage: cache=teacache: PixArtTransformer2DModel takes step caches through its declared blocks, "
        "but its declaration names no `probe` (the module whose output is the first block's modulated input, which "
        "cache=teacache measures): declare `acceleration.<module>.probe`, or use cache=first_block")
    assert str(e.value).startswith(f"{REPO / 'pipelines_yaml' / 'pixart_sigma.yaml'}:")  # its stages' file


@pytest.mark.parametrize("probe, message", [
    ("blocks..0", "'blocks..0' is not a module path (names and indices joined by '.')"),
    ("{module: blocks.0.attn1, input: hidden states}", "'hidden states' is not an argument name"),
])
def test_a_probe_that_cannot_be_right_is_a_spec_problem(tmp_path, probe, message):
    from diffstage import SpecError, check_model

    yaml = variant(tmp_path, "wan_t2v", f"acceleration:\n  transformer:\n    probe: {probe}\n")
    with pytest.raises(SpecError) as e:
        check_model(yaml)
    assert f"{yaml}:{line_of(yaml, 'probe:')}: acceleration.transformer.probe" in str(e.value)
    assert message in str(e.value)


def test_a_probe_without_the_residual_is_a_spec_problem(tmp_path):
    from diffstage import SpecError, check_model

    yaml = variant(tmp_path, "wan_t2v", "acceleration:\n  transformer:\n    residual: null\n")
    with pytest.raises(SpecError) as e:
        check_model(yaml)
    assert f"{yaml}:{line_of(yaml, 'transformer:')}: acceleration.transformer" in str(e.value)
    assert "`probe` needs `residual` (a skipped call adds the blocks' cached residual)" in str(e.value)

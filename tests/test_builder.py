"""The Python builder API: build, override, run, and request errors."""
import pytest

from diffstage import DiffstageError, RequestError, build_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_flux_dev):
    return build_pipeline("flux", model_path=tiny_flux_dev,
                          overrides=["sampling.height=32", "sampling.width=32", "sampling.num_inference_steps=2",
                                     "sampling.max_sequence_length=16"])


def test_defaults_merge_yaml_and_overrides(pipe):
    assert pipe.defaults["num_inference_steps"] == 2  # override
    assert pipe.defaults["guidance_scale"] == 3.5  # from flux.yaml
    req = pipe.make_request(prompt="x", seed=3, height=64)
    assert (req.height, req.width, req.seed) == (64, 32, 3)


def test_unknown_request_argument(pipe):
    with pytest.raises(RequestError, match=r"unknown request argument 'num_steps'.*accepted:"):
        pipe("a fox", num_steps=3)
    with pytest.raises(RequestError, match=r"'guidance' \(did you mean 'guidance_scale'\?\)"):
        pipe("a fox", guidance=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=30), "height must be a positive multiple of 16 (at most 65536), got 30"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer in [1, 1000], got 0"),
    (dict(max_sequence_length=600), "max_sequence_length must be an integer in [1, 512], got 600"),
    (dict(output_type="gif"), "output_type must be one of pil, np, pt, latent, got 'gif'"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt must be a string or a list of strings as long as prompt, got ['a', 'b']"),
])
def test_request_out_of_range(pipe, kwargs, message):
    with pytest.raises(RequestError) as e:
        pipe("a fox", seed=0, **kwargs)
    assert message in str(e.value)


def test_graph_and_repr(pipe):
    edges = pipe.graph()
    assert ("2:LatentPreparationStage", "3:TimestepPreparationStage", "latents") in edges
    assert ("1:TextEncodingStage", "4:DenoisingStage", "prompt_embeds") in edges
    assert "DenoisingStage" in repr(pipe)


def test_bad_override_and_missing_model_path():
    with pytest.raises(DiffstageError, match="unknown key 'no_such_key'; known: model, model_path"):
        build_pipeline("flux", overrides=["no_such_key=1"])
    with pytest.raises(DiffstageError, match="bad config override"):
        build_pipeline("flux", overrides=["seed=[1,"])
    with pytest.raises(DiffstageError, match="model 'flux' needs model_path=DIR_OR_REPO_ID"):
        build_pipeline("flux")


def test_latent_and_pt_outputs(pipe):
    latents = pipe("a fox", seed=0, output_type="latent").images
    assert tuple(latents.shape) == (1, 64, 16)  # 16x16 latents -> 8x8 packed tokens of 4 channels x 2x2
    image = pipe("a fox", seed=0, output_type="pt").images
    assert tuple(image.shape) == (1, 3, 32, 32) and float(image.min()) >= 0 and float(image.max()) <= 1


def test_user_yaml_by_path_with_own_callback(tiny_flux_dev, flux_yaml_variant, tmp_path, monkeypatch):
    (tmp_path / "my_flux_callbacks.py").write_text(
        "import torch\n"
        "def combine_cfg(cond, uncond, scale):\n"
        "    return uncond + scale * (cond - uncond)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = flux_yaml_variant(("      timestep_input: diffstage.models.flux.callbacks.timestep_input\n",
                              "      timestep_input: diffstage.models.flux.callbacks.timestep_input\n"
                              "      combine_cfg: my_flux_callbacks.combine_cfg\n"))
    pipe = build_pipeline(str(path), model_path=tiny_flux_dev,
                          overrides=["allowlist=[my_flux_callbacks]", "sampling.height=32", "sampling.width=32",
                                     "sampling.num_inference_steps=2", "sampling.max_sequence_length=16"])
    assert pipe.stages[4].callback("combine_cfg").__module__ == "my_flux_callbacks"
    assert pipe("a fox", seed=0, negative_prompt="", true_cfg_scale=2.0).images[0].size == (32, 32)


def test_stage_args_stay_data(tiny_flux_dev, flux_yaml_variant, tmp_path, monkeypatch):
    """A nested `_target_` or an OmegaConf interpolation in stage args is never instantiated or resolved."""
    (tmp_path / "my_stages.py").write_text(
        "from typing import Any\n"
        "from diffstage.stages import DecodingStage\n"
        "class RecordingDecoder(DecodingStage):\n"
        "    seen = None\n"
        "    def __init__(self, vae, options: Any = None):\n"
        "        super().__init__(vae)\n"
        "        RecordingDecoder.seen = options\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = flux_yaml_variant(("  - _target_: diffstage.stages.DecodingStage\n",
                              "  - _target_: my_stages.RecordingDecoder\n"
                              "    options: {nested: {_target_: os.getcwd}, env: '${oc.env:HOME}'}\n"))
    build_pipeline(str(path), model_path=tiny_flux_dev, overrides=["allowlist=[my_stages]"])
    import my_stages

    assert my_stages.RecordingDecoder.seen == {"nested": {"_target_": "os.getcwd"}, "env": "${oc.env:HOME}"}

"""The native FLUX transformer: loads Diffusers' weights strictly and matches
FluxTransformer2DModel, with every attention backend and kernel implementation, eager and
compiled; the stock Diffusers class stays selectable from the YAML."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffstage import build_pipeline
from diffstage.errors import LoadError, SpecError
from diffstage.models.flux.transformer import FluxTransformer

TOL = 1e-5
CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))


def diffusers_transformer(guidance: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG, guidance_embeds=guidance).eval()
    with torch.no_grad():  # Diffusers zero-initialises some layers; random everywhere tests more
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def saved(request, tmp_path_factory):
    """(Diffusers model, folder it was saved to) for guidance-distilled and plain configs."""
    model = diffusers_transformer(request.param)
    folder = tmp_path_factory.mktemp("transformer")
    model.save_pretrained(folder)
    return model, folder


def inputs(guidance: bool, batch: int = 2, height: int = 4, width: int = 6, text: int = 7):
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return dict(hidden_states=torch.randn(batch, height * width, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
                pooled_projections=torch.randn(batch, 24, generator=g),
                timestep=torch.rand(batch, generator=g), img_ids=img_ids, txt_ids=torch.zeros(text, 3),
                guidance=torch.full([batch], 3.5) if guidance else None)


def max_diff(native, reference, kw) -> float:
    with torch.no_grad():
        expected = reference(**kw, return_dict=False)[0]
        actual = native(**kw, return_dict=False)[0]
    assert actual.shape == expected.shape and expected.abs().max() > 1
    return float((actual - expected).abs().max())


def test_loads_diffusers_weights_and_matches(saved):
    reference, folder = saved
    native = FluxTransformer.from_pretrained(folder)
    assert set(native.state_dict()) == set(reference.state_dict())
    assert native.config.guidance_embeds == reference.config.guidance_embeds
    diff = max_diff(native, reference, inputs(reference.config.guidance_embeds))
    print(f"native vs Diffusers, float32: max|Δ| = {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("kernels, attention", [("reference", "reference"), ("compiled", "sdpa"),
                                                ("triton", "sdpa")])
def test_every_kernel_and_backend_matches_diffusers(saved, kernels, attention):
    if kernels == "triton":
        pytest.importorskip("triton")
    reference, folder = saved
    native = FluxTransformer.from_pretrained(folder)
    native.configure_runtime(attention=attention, kernels=kernels)
    assert native.ops.name == kernels and native.attention_backend == attention
    assert max_diff(native, reference, inputs(reference.config.guidance_embeds)) <= TOL


def test_regional_compile_matches_eager(saved):
    reference, folder = saved
    native = FluxTransformer.from_pretrained(folder)
    native.configure_runtime(compile=True)
    blocks = [*native.transformer_blocks, *native.single_transformer_blocks]
    assert all(b._compiled_call_impl is not None for b in blocks)  # each block compiled on its own
    assert native._compiled_call_impl is None  # not the whole model
    kw = inputs(reference.config.guidance_embeds)
    assert max_diff(native, reference, kw) <= TOL
    # a new image size reuses the dynamic-shape graphs and still matches
    assert max_diff(native, reference, inputs(reference.config.guidance_embeds, height=2, width=8)) <= TOL


def test_bfloat16_matches_diffusers_in_bfloat16(saved):
    """In bfloat16 both round differently but stay close (these random weights amplify rounding:
    either model in bfloat16 is far from float32, so the comparison is like for like)."""
    from diffusers import FluxTransformer2DModel

    reference, folder = saved
    native = FluxTransformer.from_pretrained(folder, torch_dtype=torch.bfloat16)
    stock = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert native.dtype == torch.bfloat16
    kw = {k: v.bfloat16() if v is not None and k != "timestep" else v
          for k, v in inputs(reference.config.guidance_embeds).items()}
    with torch.no_grad():
        expected = stock(**kw, return_dict=False)[0].float()
        actual = native(**kw, return_dict=False)[0]
    assert actual.dtype == torch.bfloat16
    assert float((actual.float() - expected).abs().max()) < 0.03 * float(expected.abs().max())


def rewrite_weights(folder, dst, edit):
    shutil.copytree(folder, dst)
    file = dst / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file)
    return dst


def test_strict_load_names_missing_unexpected_and_misshapen(saved, tmp_path):
    _, folder = saved
    bad = rewrite_weights(folder, tmp_path / "missing", lambda s: s.pop("proj_out.weight"))
    with pytest.raises(LoadError, match=r"weights do not fit FluxTransformer: 1 missing: proj_out\.weight$"):
        FluxTransformer.from_pretrained(bad)

    def extra_and_wrong(state):
        state["lora.weight"] = torch.zeros(2)
        state["x_embedder.bias"] = torch.zeros(3)

    bad = rewrite_weights(folder, tmp_path / "extra", extra_and_wrong)
    with pytest.raises(LoadError, match=r"1 unexpected: lora\.weight; 1 misshapen: x_embedder\.bias \(3,\) "
                                        r"\(expected \(32,\)\)"):
        FluxTransformer.from_pretrained(bad)


def test_config_and_file_errors(saved, tmp_path):
    _, folder = saved
    bad = tmp_path / "config"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_layer": 3}))
    with pytest.raises(LoadError, match=r"config\.json: FluxTransformer does not take num_layer; it takes "
                                        r".*num_layers"):
        FluxTransformer.from_pretrained(bad)
    (bad / "diffusion_pytorch_model.safetensors").unlink()
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"has no \.safetensors file \(found: config\.json\); native models load "
                                        r"safetensors only"):
        FluxTransformer.from_pretrained(bad)


def test_stock_diffusers_transformer_still_selectable(tiny_flux_dev, flux_yaml_variant):
    stock = flux_yaml_variant(("_target_: diffstage.models.flux.transformer.FluxTransformer",
                               "_target_: diffusers.FluxTransformer2DModel"))
    common = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    stock_pipe = build_pipeline(str(stock), model_path=tiny_flux_dev)
    native_pipe = build_pipeline("flux", model_path=tiny_flux_dev)
    assert type(stock_pipe.modules["transformer"]).__name__ == "FluxTransformer2DModel"
    a = stock_pipe("a red fox", seed=3, **common).images
    b = native_pipe("a red fox", seed=3, **common).images
    assert float(np.abs(a - b).max()) <= 1e-4


def test_model_yaml_picks_attention_and_bad_names_are_reported(tiny_flux_dev, flux_yaml_variant):
    from diffstage.builder import check_model

    chosen = flux_yaml_variant(("task: t2i\n", "task: t2i\nattention: reference\n"))
    pipe = build_pipeline(str(chosen), model_path=tiny_flux_dev)
    assert pipe.modules["transformer"].attention_backend == "reference"
    overridden = build_pipeline(str(chosen), model_path=tiny_flux_dev, overrides=["attention=sdpa"])
    assert overridden.modules["transformer"].attention_backend == "sdpa"

    typo = flux_yaml_variant(("task: t2i\n", "task: t2i\nattention: sdpaa\n"), name="typo.yaml")
    with pytest.raises(SpecError) as e:
        check_model(str(typo))
    text = str(e.value)
    assert "typo.yaml:5: attention: unknown attention backend 'sdpaa'; known: flash_attn, reference, sage, sdpa" in text
    assert "did you mean 'sdpa'?" in text
    # an optional backend passes the check (whether it is installed matters only if the run uses it)
    check_model(str(flux_yaml_variant(("task: t2i\n", "task: t2i\nattention: flash_attn\n"), name="fa.yaml")))


def test_bf16_matmuls_keep_the_rest_in_float32(saved):
    reference, folder = saved
    native = FluxTransformer.from_pretrained(folder, matmul_dtype="bfloat16")
    assert native.x_embedder.weight.dtype == torch.bfloat16 and native.proj_out.bias.dtype == torch.bfloat16
    assert native.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
    assert native.dtype == torch.float32  # the activations' dtype
    kw = inputs(reference.config.guidance_embeds)
    with torch.no_grad():
        expected = reference(**kw, return_dict=False)[0]
        actual = native(**kw, return_dict=False)[0]
    assert actual.dtype == torch.float32
    error = float((actual - expected).abs().max()) / float(expected.abs().max())
    assert 0 < error < 0.03  # bf16 rounding in the matmuls only
    # configuring after loading casts the same way
    late = FluxTransformer.from_pretrained(folder)
    late.configure_runtime(matmul_dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(late(**kw, return_dict=False)[0], actual)


def test_truncated_weights_file_is_a_load_error(saved, tmp_path):
    _, folder = saved
    bad = tmp_path / "truncated"
    shutil.copytree(folder, bad)
    file = bad / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(LoadError, match=r"cannot read .*diffusion_pytorch_model\.safetensors: ValueError: tensor "
                                        r"'.*' has data offsets \[\d+, \d+\] for \d+ bytes .* in \d+ bytes of data"):
        FluxTransformer.from_pretrained(bad)


def test_bad_matmul_dtype_fails_before_loading(tiny_flux_dev):
    from diffstage.errors import DiffstageError

    with pytest.raises(DiffstageError, match=r"unknown dtype 'int8'; use one of: float32, bfloat16, float16"):
        build_pipeline("flux", model_path=tiny_flux_dev, overrides=["runtime.matmul_dtype=int8"])


def test_runtime_options_reach_the_native_transformer(tiny_flux_dev):
    pipe = build_pipeline("flux", model_path=tiny_flux_dev,
                          overrides=["runtime.compile=true", "runtime.kernels=compiled", "attention=reference",
                                     "runtime.matmul_dtype=bfloat16"])
    native = pipe.modules["transformer"]
    assert native.ops.name == "compiled" and native.attention_backend == "reference"
    assert native.x_embedder.weight.dtype == torch.bfloat16 and native.dtype == torch.float32
    assert all(b._compiled_call_impl is not None
               for b in [*native.transformer_blocks, *native.single_transformer_blocks])


def test_sharded_and_variant_files(saved, tmp_path):
    reference, folder = saved
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    names = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(folder / "config.json", sharded)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, sharded / file)
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, keys in halves.items() for k in keys}}))
    save_file({"stray.weight": torch.zeros(1)}, sharded / "not-in-the-index.safetensors")
    native = FluxTransformer.from_pretrained(sharded)
    assert max_diff(native, reference, inputs(reference.config.guidance_embeds)) <= TOL

    variant = rewrite_weights(folder, tmp_path / "variant", lambda s: None)
    save_file({k: v.half() for k, v in state.items()}, variant / "diffusion_pytorch_model.fp16.safetensors")
    assert FluxTransformer.from_pretrained(variant).x_embedder.weight.dtype == torch.float32

    duplicated = tmp_path / "duplicated"
    shutil.copytree(sharded, duplicated)
    (duplicated / "diffusion_pytorch_model.safetensors.index.json").unlink()
    (duplicated / "not-in-the-index.safetensors").unlink()
    save_file({names[0]: state[names[0]]}, duplicated / "model-00003.safetensors")
    with pytest.raises(LoadError, match=rf"tensor '{names[0]}' is in both .*model-00001-of-00002\.safetensors "
                                        r"and .*model-00003\.safetensors"):
        FluxTransformer.from_pretrained(duplicated)


def write_raw_safetensors(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8,
     r"tensor 'w' has data offsets \[-8, 0\] for 8 bytes \(shape \[2\]\) in 8 bytes of data"),
    ({"w": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6], "data_offsets": [0, 8]}}, b"\0" * 8,
     r"tensor 'w' has data offsets \[0, 8\] for 4000000000000 bytes"),
    ({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2,
     r"tensor 'w' has dtype 'F8_E4M3'; supported: F64, F32"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", r"tensor 'w' has shape \[-1\]"),
])
def test_malformed_safetensors_headers_are_load_errors(tmp_path, header, data, message):
    from diffstage.native import iter_safetensors

    file = tmp_path / "bad.safetensors"
    write_raw_safetensors(file, header, data)
    with pytest.raises(LoadError, match=r"cannot read .*bad\.safetensors: ValueError: " + message):
        list(iter_safetensors(file))
    file.write_bytes((2 ** 62).to_bytes(8, "little") + b"{}")
    with pytest.raises(LoadError, match=r"header length 4611686018427387904 does not fit a 10-byte file"):
        list(iter_safetensors(file))


def test_constructor_and_call_errors(saved):
    reference, folder = saved
    with pytest.raises(ValueError, match=r"axes_dims_rope \[4, 6, 4\] must sum to attention_head_dim \(16\)"):
        FluxTransformer(**{**CONFIG, "axes_dims_rope": (4, 6, 4)})
    if reference.config.guidance_embeds:
        native = FluxTransformer.from_pretrained(folder)
        with pytest.raises(ValueError, match=r"this FLUX transformer embeds the guidance scale: pass `guidance`"):
            native(**{**inputs(True), "guidance": None})


def test_header_that_is_not_an_object(tmp_path):
    from diffstage.native import iter_safetensors

    file = tmp_path / "list.safetensors"
    write_raw_safetensors(file, [])  # type: ignore[arg-type]
    with pytest.raises(LoadError, match=r"cannot read .*list\.safetensors: ValueError: header is not a JSON object"):
        list(iter_safetensors(file))

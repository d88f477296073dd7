"""LoRA adapters per request (framework/lora.py, lora_files.py): parity with Diffusers' load_lora_weights +
set_adapters on tiny FLUX, SD3 and SD 1.5 checkpoints, switching without reloading, bad files refused with
nothing applied, fusing, and the run config's `lora` list."""
import copy
import time

import numpy as np
import pytest
import torch

from conftest import assert_matches_diffusers

peft = pytest.importorskip("peft")

from diffstage import DiffstageError, Session, build_pipeline  # noqa: E402
from diffstage.errors import LoraError  # noqa: E402

TOL = 1e-4
# Per model: the Diffusers pipeline class, the tiny checkpoint builder, the request, and the layers each
# adapter targets per module (attention projections; SD 1.5 adapts its text encoder too).
FAMILIES = {
    "flux": ("FluxPipeline", "diffstage.models.flux.tiny:build_tiny_flux",
             dict(height=32, width=32, max_sequence_length=16, guidance_scale=3.5),
             {"transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj"]}),
    "sd3": ("StableDiffusion3Pipeline", "diffstage.models.sd3.tiny:build_tiny_sd3",
            dict(height=32, width=32, max_sequence_length=16, guidance_scale=4.0, negative_prompt="blurry"),
            {"transformer": ["to_q", "to_k", "to_v", "to_out.0"]}),
    "sd15": ("StableDiffusionPipeline", "diffstage.models.sd15.tiny:build_tiny_sd15",
             dict(height=32, width=32, guidance_scale=7.5),
             {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}),
}
PROMPT = "a red fox in the snow"


def make_lora(ref, path, targets, seed, r=4, alpha=4):
    """A random LoRA made with peft on copies of `ref`'s modules, saved by Diffusers in its own format
    (module-prefixed peft keys, the LoraConfig as metadata)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    kwargs = {}
    for name, layers in targets.items():
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=layers, init_lora_weights=False)
        module = inject_adapter_in_model(config, copy.deepcopy(getattr(ref, name)), adapter_name="x")
        kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(module, adapter_name="x")
        kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(ref).save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """model -> (Diffusers pipeline with adapters first and second loaded, our pipeline, {a, b: LoRA files})."""
    import importlib

    import diffusers

    made = {}

    def get(model):
        if model not in made:
            cls, builder, _, targets = FAMILIES[model]
            module, fn = builder.split(":")
            folder = tmp_path_factory.mktemp(f"lora-{model}")
            ckpt = getattr(importlib.import_module(module), fn)(folder / "ckpt")
            ref = getattr(diffusers, cls).from_pretrained(ckpt, torch_dtype=torch.float32)
            ref.set_progress_bar_config(disable=True)
            # adapter b: another rank, and alpha != r (Diffusers reads it from the metadata)
            files = {"first": make_lora(ref, folder / "first.safetensors", targets, seed=1),
                     "second": make_lora(ref, folder / "second.safetensors", targets, seed=2, r=2, alpha=4)}
            for name, file in files.items():
                ref.load_lora_weights(str(file), adapter_name=name)
            made[model] = ref, build_pipeline(model, model_path=ckpt, session=Session()), files
        return made[model]

    return get


def run_ours(pipe, model, loras=None, **kw):
    return pipe(PROMPT, seed=3, num_inference_steps=2, output_type="np", loras=loras, **FAMILIES[model][2], **kw).images


def run_reference(ref, model, names, weights):
    ref.set_adapters(names, adapter_weights=weights)
    return ref(PROMPT, generator=torch.Generator("cpu").manual_seed(3), num_inference_steps=2, output_type="np",
               **FAMILIES[model][2]).images


CASES = {"one": [("first", 0.8)], "two": [("first", 0.7), ("second", 0.5)], "zero": [("first", 0.0)]}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_parity_with_diffusers(family, model, case):
    ref, pipe, files = family(model)
    names, weights = zip(*CASES[case])
    expected = run_reference(ref, model, list(names), list(weights))
    ours = run_ours(pipe, model, [{"path": str(files[n]), "scale": w} for n, w in CASES[case]])
    assert_matches_diffusers(ours, expected, f"lora {model}/{case}", TOL)
    base = run_ours(pipe, model)
    if case == "zero":
        assert np.array_equal(ours, base)  # scale 0 is the base model, exactly
    else:
        assert np.abs(ours - base).max() > 1e-3  # the adapters change the image


def lora(path, scale=1.0):
    return [{"path": str(path), "scale": scale}]


@pytest.fixture
def counted_reads(monkeypatch):
    """How many LoRA files were read (diffstage.lora's file reader, counted)."""
    import diffstage.lora as lora_module

    reads = []
    real = lora_module.load_lora_file
    monkeypatch.setattr(lora_module, "load_lora_file", lambda path, *a, **kw: reads.append(path) or real(path, *a, **kw))
    return reads


def test_switching_adapters_reads_no_file_and_gives_each_solo_output(family, counted_reads, capsys):
    ref, pipe, files = family("sd15")
    first, second = lora(files["first"], 0.8), lora(files["second"], 0.6)
    run_ours(pipe, "sd15", first), run_ours(pipe, "sd15", second)  # each file read once, at most
    counted_reads.clear()
    outputs, same, switched = {}, [], []
    for label, chosen, times in (("first", first, same), ("first again", first, same), ("second (switched)", second,
                                 switched), ("first (switched)", first, switched), ("first same", first, same),
                                 ("second (switched again)", second, switched)):
        start = time.perf_counter()
        outputs[label] = run_ours(pipe, "sd15", chosen)
        times.append(time.perf_counter() - start)
    assert counted_reads == []  # switching read no file again
    # each equals a pipeline that only ever had that adapter (the run config's lora, another session)
    for label, chosen in (("second (switched)", second), ("first (switched)", first)):
        solo = build_pipeline("sd15", model_path=pipe.checkpoint, session=Session(),
                              overrides=[f"lora=[{{path:'{chosen[0]['path']}',scale:{chosen[0]['scale']}}}]"])
        assert np.array_equal(outputs[label], run_ours(solo, "sd15"))
    assert np.array_equal(outputs["first"], outputs["first (switched)"])
    with capsys.disabled():  # measured, not asserted: the machine may be busy
        print(f"\nlora call time (sd15 tiny, 2 steps), fastest of 3: same adapters {min(same) * 1000:.1f} ms, "
              f"after switching {min(switched) * 1000:.1f} ms")


def test_text_encoding_is_reused_only_for_the_same_adapters(family):
    _, pipe, files = family("sd15")  # its adapters change the text encoder too
    kw = dict(num_inference_steps=2, output_type="np", height=32, width=32)
    pipe("a blue cat", seed=0, loras=lora(files["first"]), **kw)
    again = pipe("a blue cat", seed=1, loras=lora(files["first"]), **kw)
    switched = pipe("a blue cat", seed=1, loras=lora(files["second"]), **kw)
    rescaled = pipe("a blue cat", seed=1, loras=lora(files["second"], 0.5), **kw)
    encoder = "1:TextEncodingStage"
    assert encoder in again.reused and encoder not in switched.reused and encoder not in rescaled.reused


def test_adapters_of_the_denoiser_alone_keep_the_text_encoding(family):
    _, pipe, files = family("flux")  # its adapters change the transformer only
    kw = dict(num_inference_steps=2, output_type="np", height=32, width=32, max_sequence_length=16)
    pipe("a blue cat", seed=0, loras=lora(files["first"]), **kw)
    assert "1:TextEncodingStage" in pipe("a blue cat", seed=0, loras=lora(files["second"]), **kw).reused


def write_state(path, state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def read_state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_bad_files_are_refused_naming_file_and_key_and_leave_the_model_as_it_was(family, tmp_path):
    ref, pipe, files = family("sd15")
    base = run_ours(pipe, "sd15")
    state = read_state(files["first"])
    key = sorted(k for k in state if k.startswith("unet.") and k.endswith("lora_A.weight"))[-1]
    shapes = dict(state, **{key: torch.zeros(4, state[key].shape[1] + 1)})  # the last layer misfits: earlier ones fit
    conv = dict(state, **{"unet.conv_in.lora_A.weight": torch.zeros(4, 4), "unet.conv_in.lora_B.weight": torch.zeros(4, 4)})
    pickle = tmp_path / "adapter.bin"
    torch.save(state, pickle)
    _, _, flux_files = family("flux")
    cases = [
        (write_state(tmp_path / "shapes.safetensors", shapes),
         rf"key '{key}': shapes do not fit '.*' of module 'unet' \(\d+ -> \d+\): lora_A \[4, \d+\] must be \[r, \d+\]"),
        (pickle, r"a pickle file \(\.bin\), and loading pickle can run arbitrary code; convert it to safetensors, or "
                 r"set allow_pickle=true"),
        (flux_files["first"], r"key 'transformer\..*': it is for module 'transformer', which this model does not have "
                              r"\(its modules: .*unet"),
        (write_state(tmp_path / "conv.safetensors", conv),
         r"key 'unet.conv_in.lora_A.weight': 'conv_in' of module 'unet' is a Conv2d, not a Linear"),
        (write_state(tmp_path / "typo.safetensors", {"unet.down_blocks.0.attentions.0.nope.lora_A.weight": torch.zeros(1, 1)}),
         r"key 'unet.down_blocks.0.attentions.0.nope.lora_A.weight': module 'unet' has no layer"),
        (tmp_path / "missing.safetensors", r"cannot read it \(No such file or directory\)"),
        (write_state(tmp_path / "rank0.safetensors", dict(state, **{key: torch.zeros(0, state[key].shape[1]),
                                                                  key.replace("lora_A", "lora_B"): torch.zeros(
                                                                      state[key.replace("lora_A", "lora_B")].shape[0], 0)})),
         rf"key '{key}': rank 0 \(lora_A \[0, \d+\]\): an adapter of rank 0 adds nothing; leave the layer out"),
        (write_state(tmp_path / "nan.safetensors", dict(state, **{key: torch.full_like(state[key], float("nan"))})),
         rf"key '{key}': weights that are not finite \(NaN or infinity\)"),
        (write_state(tmp_path / "nan_alpha.safetensors",
                     dict(state, **{key.replace(".lora_A.weight", ".alpha"): torch.tensor(float("nan"))})),
         r"key '.*': alpha is nan, not a finite number"),
        (write_state(tmp_path / "no_b.safetensors", {k: v for k, v in state.items()
                                                     if k != key.replace("lora_A", "lora_B")}),
         rf"key '{key}': '.*' has lora_A/down but no lora_B/up weight"),
    ]
    for path, message in cases:
        with pytest.raises(LoraError, match=rf"^LoRA file {path}: {message}"):
            run_ours(pipe, "sd15", lora(path) + lora(files["second"]))
        assert np.array_equal(run_ours(pipe, "sd15"), base)  # nothing half-applied
    assert not np.array_equal(run_ours(pipe, "sd15", lora(files["first"])), base)  # and the pipeline still works


def test_pickle_files_load_when_allowed(family, tmp_path):
    _, pipe, files = family("sd15")
    pickle = tmp_path / "adapter.pt"
    torch.save(read_state(files["first"]), pickle)
    trusting = build_pipeline("sd15", model_path=pipe.checkpoint, overrides=["allow_pickle=true"], session=Session())
    assert np.array_equal(run_ours(trusting, "sd15", lora(pickle, 0.8)), run_ours(pipe, "sd15", lora(files["first"], 0.8)))


def kohya(state):
    """Diffusers-format keys as Kohya writes them: lora_unet_/lora_te_, dots as underscores, lora_down/up, alpha."""
    out = {}
    for key, value in state.items():
        module, path = key.split(".", 1)
        target, _, kind = path.rpartition(".lora_")
        flat = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[module] + target.replace(".", "_")
        out[f"{flat}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        out[f"{flat}.alpha"] = torch.tensor(8.0)  # alpha 8 on rank 4: twice the scale of the Diffusers file
    return out


def test_kohya_keys_match_the_same_adapter_in_diffusers_format(family, tmp_path):
    ref, pipe, files = family("sd15")
    path = write_state(tmp_path / "kohya.safetensors", kohya(read_state(files["first"])))
    ours = run_ours(pipe, "sd15", lora(path, 0.4))
    assert np.abs(ours - run_ours(pipe, "sd15", lora(files["first"], 0.8))).max() < 1e-5
    ref.load_lora_weights(str(path), adapter_name="kohya")  # Diffusers' own Kohya converter, for parity
    assert_matches_diffusers(ours, run_reference(ref, "sd15", ["kohya"], [0.4]), "lora sd15/kohya", TOL)


def test_fuse_merges_one_set_and_unfuse_restores_the_weights(family):
    _, shared, files = family("sd15")
    session = Session()
    pipe = build_pipeline("sd15", model_path=shared.checkpoint, session=session)
    base, unfused = run_ours(pipe, "sd15"), run_ours(pipe, "sd15", lora(files["first"], 0.8))
    other = build_pipeline("sd15", model_path=shared.checkpoint, session=session)  # the same modules
    with pytest.raises(LoraError, match=r"cannot fuse LoRA adapters into module '(text_encoder|unet)': 1 other "
                                        r"pipeline\(s\) in this process hold the same module"):
        pipe.fuse_loras(lora(files["first"], 0.8))
    del other
    pipe.fuse_loras(lora(files["first"], 0.8))
    with pytest.raises(LoraError, match=r"^LoRA adapters are fused already \(.*first.safetensors x0.8\); call "
                                        r"pipe.unfuse_loras\(\) first$"):
        pipe.fuse_loras(lora(files["second"], 0.5))
    fused = pipe(PROMPT, seed=3, num_inference_steps=2, output_type="np", **FAMILIES["sd15"][2]).images
    assert np.abs(fused - unfused).max() < 1e-5  # merged into the weights: the same image
    later = build_pipeline("sd15", model_path=shared.checkpoint, session=session)  # loads its own modules
    assert later.modules["unet"] is not pipe.modules["unet"] and np.array_equal(run_ours(later, "sd15"), base)
    with pytest.raises(LoraError, match=r"fused into its weights \(.*first.safetensors x0.8\); a request for another "
                                        r"set \(.*second.safetensors x1\) needs pipe.unfuse_loras\(\) first"):
        run_ours(pipe, "sd15", lora(files["second"]))
    pipe.unfuse_loras()
    assert np.array_equal(run_ours(pipe, "sd15"), base)


@pytest.mark.parametrize("value,message", [
    ("foo", "lora must be a list of adapters such as [{path: style.safetensors, scale: 0.8}], got 'foo'"),
    ("[{path:x.safetensors,scale:abc}]", "lora[0].scale must be a number, got 'abc'"),
    ("[{pth:x.safetensors}]", "lora[0]: unknown key 'pth' (did you mean 'path'?)"),
    ("[x.safetensors]", "lora[0] must be a mapping {path: FILE, scale: NUMBER}, got 'x.safetensors'"),
])
def test_run_config_entries_are_checked(value, message):
    with pytest.raises(DiffstageError) as e:
        build_pipeline("sd15", model_path="unused", overrides=[f"lora={value}"])
    assert message in str(e.value)


def test_python_loras_are_checked(family):
    _, pipe, _ = family("sd15")
    with pytest.raises(LoraError, match=r"invalid loras:\n  - loras\[0\].path must be the path of a LoRA file"):
        run_ours(pipe, "sd15", [{"scale": 1.0}])


def test_cli_generate_applies_the_run_config_adapters_and_records_them(family, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    _, pipe, files = family("sd15")
    cmd = [sys.executable, "-m", "diffstage.cli", "generate", "model=sd15", f"model_path={pipe.checkpoint}",
           "prompt=a red fox in the snow", "seed=3", "sampling.num_inference_steps=2", "sampling.height=32",
           "sampling.width=32", f"lora=[{{path:'{files['first']}',scale:0.8}}]", f"hydra.run.dir={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    image = Image.open(r.stdout.strip().splitlines()[-1])
    assert image.text["lora"] == f"[{{path: {files['first']}, scale: 0.8}}]"
    expected = pipe("a red fox in the snow", seed=3, num_inference_steps=2, height=32, width=32,
                    loras=lora(files["first"], 0.8)).images[0]
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    bad = subprocess.run(cmd[:-2] + ["lora=[{path:nothing.safetensors}]", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "LoRA file nothing.safetensors: cannot read it" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_adapters_with_cpu_offload_match_and_fusing_is_refused(family):
    _, pipe, files = family("sd15")
    low = build_pipeline("sd15", model_path=pipe.checkpoint, overrides=["runtime.offload=model"], session=Session())
    chosen = lora(files["first"], 0.7) + lora(files["second"], 0.4)
    assert np.array_equal(run_ours(low, "sd15", chosen), run_ours(pipe, "sd15", chosen))
    with pytest.raises(LoraError, match=r"cannot fuse LoRA adapters: runtime.offload=model reloads weights from the "
                                        r"checkpoint; use them unfused"):
        low.fuse_loras(chosen)


def test_adapters_on_compiled_blocks_are_refused_unfused(family):
    _, shared, files = family("flux")
    pipe = build_pipeline("flux", model_path=shared.checkpoint, session=Session())
    pipe.modules["transformer"].transformer_blocks[0].compile(dynamic=True)  # as runtime.compile does (traced lazily)
    with pytest.raises(LoraError, match=r"LoRA file .*first.safetensors: layer 'transformer.transformer_blocks.0.attn"
                                        r"\.\w+' is in a block that runtime.compile compiled, whose code does not call "
                                        r"the adapters; fuse them \(pipe.fuse_loras\) or build with runtime.compile=false"):
        run_ours(pipe, "flux", lora(files["first"]))


def test_pipelines_sharing_modules_see_only_their_own_adapters(family):
    from concurrent.futures import ThreadPoolExecutor

    _, alone, files = family("sd15")
    base, adapted = run_ours(alone, "sd15"), run_ours(alone, "sd15", lora(files["first"]))
    session = Session()
    with_lora = build_pipeline("sd15", model_path=alone.checkpoint, session=session,
                               overrides=[f"lora=[{{path:'{files['first']}'}}]"])
    plain = build_pipeline("sd15", model_path=alone.checkpoint, session=session)
    assert plain.modules["unet"] is with_lora.modules["unet"]  # one module, shared through the session
    assert np.array_equal(run_ours(with_lora, "sd15", lora(files["first"])), adapted)
    assert np.array_equal(run_ours(plain, "sd15"), base)  # nor is the adapted text encoding reused for it
    with ThreadPoolExecutor(2) as pool:  # at the same time, in two threads
        runs = [pool.submit(run_ours, p, "sd15", None) for p in (with_lora, plain, with_lora, plain)]
        outputs = [r.result() for r in runs]
    assert all(np.array_equal(o, adapted) for o in outputs[::2]) and all(np.array_equal(o, base) for o in outputs[1::2])


def test_peft_keys_without_a_module_prefix_find_their_module(family, tmp_path):
    _, pipe, files = family("sd15")
    state = read_state(files["first"])  # unet.* and text_encoder.* keys
    bare = {"base_model.model." + key.split(".", 1)[1]: value for key, value in state.items()}
    path = write_state(tmp_path / "bare.safetensors", bare)
    assert np.array_equal(run_ours(pipe, "sd15", lora(path, 0.8)), run_ours(pipe, "sd15", lora(files["first"], 0.8)))
    te_only = write_state(tmp_path / "te.safetensors", {"lora_te2_text_model_x.lora_down.weight": torch.zeros(1, 1)})
    with pytest.raises(LoraError, match=r"key 'lora_te2_text_model_x.lora_down.weight': it is for module "
                                        r"'text_encoder_2', which this model does not have \(its modules: "):
        run_ours(pipe, "sd15", lora(te_only))


def test_the_memory_check_counts_adapter_files_not_read_yet(family, tmp_path, monkeypatch):
    from diffstage import memory
    from diffstage.errors import RequestError

    _, _, files = family("sd15")
    fresh = tmp_path / "fresh.safetensors"
    fresh.write_bytes(files["first"].read_bytes())  # a file this pipeline has not read
    ckpt = family("sd15")[1].checkpoint
    pipe = build_pipeline("sd15", model_path=ckpt, session=Session())
    req = pipe.make_request(prompt=PROMPT, seed=0, num_inference_steps=2, loras=lora(fresh))
    hook = next(h for h in pipe.hooks if hasattr(h, "fuse"))
    assert hook.memory_estimate(pipe.stages, req) == {"LoRA adapters to load": fresh.stat().st_size}
    stages_need = sum(n for stage in pipe.stages for n in stage.memory_estimate(req).values())
    monkeypatch.setattr(memory, "available_bytes", lambda device: stages_need + 16)
    with pytest.raises(RequestError, match=r"LoRA adapters to load"):
        pipe.check_request(req)
    monkeypatch.undo()
    pipe(PROMPT, seed=0, num_inference_steps=2, loras=lora(fresh))  # read now: nothing more to load
    assert hook.memory_estimate(pipe.stages, req) == {}


def test_unfuse_without_a_fuse_is_refused_and_keeps_the_default_adapters(family):
    _, shared, files = family("sd15")
    pipe = build_pipeline("sd15", model_path=shared.checkpoint, session=Session(),
                          overrides=[f"lora=[{{path:'{files['first']}'}}]"])
    adapted = pipe(PROMPT, seed=3, num_inference_steps=2, output_type="np", **FAMILIES["sd15"][2]).images
    with pytest.raises(LoraError, match=r"^no LoRA adapters are fused into this pipeline's weights \(pipe.fuse_loras "
                                        r"fuses them\)$"):
        pipe.unfuse_loras()
    again = pipe(PROMPT, seed=3, num_inference_steps=2, output_type="np", **FAMILIES["sd15"][2]).images
    assert np.array_equal(again, adapted)  # the run config's adapters are still every request's default


def test_a_home_relative_path_reads_the_file(family, tmp_path, monkeypatch):
    _, pipe, files = family("sd15")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "style.safetensors").write_bytes(files["first"].read_bytes())
    assert np.array_equal(run_ours(pipe, "sd15", lora("~/style.safetensors")), run_ours(pipe, "sd15", lora(files["first"])))


def test_adapters_on_blocks_another_pipeline_compiled_are_refused_not_dropped(family):
    _, shared, files = family("sd3")
    session = Session()
    adapted = build_pipeline("sd3", model_path=shared.checkpoint, session=session,
                             overrides=[f"lora=[{{path:'{files['first']}'}}]", "runtime.compile=false"])
    compiled = build_pipeline("sd3", model_path=shared.checkpoint, session=session, overrides=["runtime.compile=true"])
    if compiled.modules["transformer"] is not adapted.modules["transformer"]:
        pytest.skip("the transformer is no longer shared between compile=true and compile=false pipelines")
    with pytest.raises(LoraError, match=r"is in a block that runtime.compile compiled"):
        adapted(PROMPT, seed=3, num_inference_steps=2, output_type="np", **FAMILIES["sd3"][2])


def test_empty_and_dora_files_are_refused_naming_the_file(family, tmp_path):
    import json

    from safetensors.torch import save_file

    _, pipe, files = family("sd15")
    empty = write_state(tmp_path / "empty.safetensors", {})
    dora = tmp_path / "dora.safetensors"
    save_file(read_state(files["first"]), str(dora),
              metadata={"lora_adapter_metadata": json.dumps({"unet.use_dora": True})})
    for path, message in ((empty, "holds no tensors"), (dora, r"a DoRA adapter \(use_dora\), which is not supported")):
        with pytest.raises(LoraError, match=rf"^LoRA file {path}: {message}$"):
            run_ours(pipe, "sd15", lora(path))

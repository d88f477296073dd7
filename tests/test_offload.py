"""runtime.offload: the CPU's low-memory mode (modules load for their stages, large ones are released after
them) gives the default's images, run after run; the pre-run memory check counts the weights it will load;
offload=layers' block streaming runs its blocks in order; the refusals say what to do."""
import numpy as np
import pytest
import torch

from diffstage import build_pipeline
from diffstage.errors import DiffstageError, RequestError
from diffstage.offload import OffloadHook
from diffstage.offload_layers import BlockStreamer, repeated_blocks
from diffstage.session import Session

OFF = ["runtime.offload=model", "reuse.enabled=false"]  # no reused stage outputs: every stage loads its modules
TOL = 1e-6  # float32 on the same CPU with the same weights: the images are equal, this only allows for printing


def released(module: torch.nn.Module) -> bool:
    """No real storage behind any of the module's tensors (all on the meta device)."""
    return all(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])


def offload_hook(pipe) -> OffloadHook:
    return next(h for h in pipe.hooks if isinstance(h, OffloadHook))


def two_runs_match(default, offloaded, **request) -> None:
    """Two consecutive runs of `offloaded` give `default`'s image, and leave the text encoder released."""
    expected = np.asarray(default(output_type="np", **request).images)
    encoder = offloaded.modules["text_encoder"]
    calls = []
    encoder.register_forward_hook(lambda *a: calls.append(1))
    for run in range(2):
        before = len(calls)
        image = np.asarray(offloaded(output_type="np", **request).images)
        assert np.abs(image - expected).max() <= TOL, f"run {run + 1}"
        assert len(calls) > before  # the text encoder ran (loaded again on the second run)
        assert released(encoder) and released(offloaded.modules["transformer"])
        assert offloaded.modules["text_encoder"] is encoder  # the object the stages hold stays


def test_digits_offload_gives_the_default_images_over_two_runs():
    request = dict(prompt="a handwritten digit three", seed=0, num_inference_steps=3)
    two_runs_match(build_pipeline("digits"), build_pipeline("digits", overrides=OFF), **request)


def test_tiny_flux_offload_gives_the_default_images_over_two_runs(tiny_flux_dev):
    request = dict(prompt="a red fox", seed=1, num_inference_steps=2, height=32, width=32, max_sequence_length=16)
    default = build_pipeline("flux", model_path=tiny_flux_dev)
    two_runs_match(default, build_pipeline("flux", model_path=tiny_flux_dev, overrides=OFF), **request)


def test_modules_load_at_their_first_stage_not_at_build_and_stay_out_of_the_cache():
    session = Session()
    resident = build_pipeline("digits", session=session)
    offloaded = build_pipeline("digits", overrides=OFF, session=session)
    assert released(offloaded.modules["transformer"]) and released(offloaded.modules["vae"])  # nothing read yet
    assert offloaded.modules["transformer"] is not resident.modules["transformer"]  # not shared with a resident one
    offloaded("a handwritten digit one", seed=0, num_inference_steps=2)
    assert not released(resident.modules["transformer"]) and not released(resident.modules["text_encoder"])
    hook = offload_hook(offloaded)
    assert hook.modules.entries["text_encoder"].releasable  # digits' encoders hold >= 0.5% of its weights


def test_a_failed_run_releases_what_it_loaded(monkeypatch):
    pipe = build_pipeline("digits", overrides=OFF)
    decoding = pipe.stages[-1]
    monkeypatch.setattr(decoding, "forward", lambda req: (_ for _ in ()).throw(RuntimeError("decoder broke")))
    with pytest.raises(DiffstageError, match="decoder broke"):
        pipe("a handwritten digit two", seed=0, num_inference_steps=2)
    assert released(pipe.modules["transformer"]) and released(pipe.modules["vae"])


def test_the_memory_check_counts_the_weights_offload_will_load(monkeypatch):
    from diffstage import memory

    default = build_pipeline("digits")
    offloaded = build_pipeline("digits", overrides=OFF)
    req = offloaded.make_request(prompt="a handwritten digit four", seed=0, num_inference_steps=2)
    offloaded.check_request(req)  # completes the request; fits with the machine's real memory
    stages_need = sum(n for stage in offloaded.stages for n in stage.memory_estimate(req).values())
    weights = offload_hook(offloaded).memory_estimate(offloaded.stages, req)
    entries = offload_hook(offloaded).modules.entries
    # the largest stage's modules: the transformer and the VAE (latent preparation reads both), not the encoders
    assert list(weights.values()) == [entries["transformer"].nbytes + entries["vae"].nbytes]
    monkeypatch.setattr(memory, "available_bytes", lambda device: stages_need + 1024)
    with pytest.raises(RequestError, match=r"weights loaded for their stages \(runtime.offload\)"):
        offloaded.check_request(req)
    default.check_request(default.make_request(prompt="a handwritten digit four", seed=0, num_inference_steps=2))


def test_offload_layers_on_the_cpu_is_refused_with_what_to_use():
    with pytest.raises(DiffstageError) as e:
        build_pipeline("digits", overrides=["runtime.offload=layers"])
    assert str(e.value) == (
        "runtime.offload=layers streams the transformer's blocks to a CUDA device, but the run's device is cpu: there "
        "is no other device to stream from; use runtime.offload=model (the CPU's low-memory mode: modules load for "
        "their stages and large ones are released)")


def test_an_unknown_offload_value_names_the_key_and_the_choices():
    with pytest.raises(DiffstageError, match=r"runtime.offload must be one of none \| model \| layers, got 'modle' "
                                             r"\(did you mean 'model'\?\)"):
        build_pipeline("digits", overrides=["runtime.offload=modle"])


def test_offload_with_quantize_on_the_cpu_is_refused():
    pytest.importorskip("torchao")
    with pytest.raises(DiffstageError, match="runtime.offload=model with runtime.quantize=int8 on the CPU: released "
                                             "modules reload from the checkpoint"):
        build_pipeline("digits", overrides=["runtime.offload=model", "runtime.quantize=int8"])


class Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(4, 4)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        x = self.head(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_block_streaming_fills_the_next_block_before_each_block_runs_and_empties_it_after():
    """The hook order offload=layers relies on, with device="cpu" objects (the copies are plain, no stream)."""
    model, x = Chain(), torch.randn(2, 4)
    expected = model(x)
    events = []
    BlockStreamer(model, "cpu", events)
    assert torch.equal(model(x), expected)
    assert events == [("fill", 0), ("fill", 1), ("run", 0), ("empty", 0), ("fill", 2), ("run", 1), ("empty", 1),
                      ("fill", 0), ("run", 2), ("empty", 2)]


def test_repeated_blocks_of_a_native_transformer_are_its_declared_lists():
    transformer = build_pipeline("digits").modules["transformer"]
    blocks = repeated_blocks(transformer)
    assert blocks == [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload on CUDA needs a GPU (none here)")
@pytest.mark.parametrize("mode", ["model", "layers"])
def test_cuda_offload_gives_the_default_images(tiny_flux_dev, mode):
    request = dict(prompt="a red fox", seed=1, num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                   output_type="np")
    cuda = ["runtime=cuda", "runtime.dtype=float32"]
    expected = build_pipeline("flux", model_path=tiny_flux_dev, overrides=cuda)(**request).images
    pipe = build_pipeline("flux", model_path=tiny_flux_dev, overrides=[*cuda, f"runtime.offload={mode}"])
    for _ in range(2):
        assert np.abs(np.asarray(pipe(**request).images) - np.asarray(expected)).max() <= 1e-5


@pytest.mark.parametrize("runtime, message", [
    ({"offload": "model", "quantize": "fp8"}, "runtime.offload=model with runtime.quantize=fp8 is not supported yet"),
    ({"offload": "layers", "quantize": "int8"}, "runtime.offload=layers with runtime.quantize=int8 is not supported yet"),
    ({"offload": "layers", "compile": True}, "runtime.offload=layers with runtime.compile=true is not supported yet"),
])
def test_combinations_never_run_on_a_gpu_are_refused_on_cuda(runtime, message):
    from diffstage.offload import check_offload

    with pytest.raises(DiffstageError, match=message.replace(".", r"\.")):
        check_offload(runtime, torch.device("cuda"))  # the check reads the device type only: no GPU needed
    assert check_offload({"offload": runtime["offload"]}, torch.device("cuda")) == runtime["offload"]

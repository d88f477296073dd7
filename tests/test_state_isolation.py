"""Process state (the module cache, stage-output reuse, step caches) serves only what it truly holds:
checkpoints by file identity, classes and callbacks by an identity that cannot be recycled, images by
content; per-run state stays with the run, and one pipeline's settings never change another's."""
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from diffstage import PipelineBuilder, build_pipeline
from diffstage.reuse import fingerprint
from diffstage.session import Session, default_session

PROMPT = "a handwritten digit four"
DIGITS = REPO / "models" / "digits" / "checkpoint"
FAST = dict(num_inference_steps=4, output_type="np")


@pytest.fixture(autouse=True)
def no_reused_outputs():
    """Reuse counts below start from an empty cache (other tests of the process fill the default one)."""
    default_session().reuse.clear()
    yield
    default_session().reuse.clear()


def perturb_in_place(file, seed: int) -> None:
    """Rewrite a safetensors file at the same path with other weights (a fine-tune step saving over it)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.2 * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
               for k, v in tensors.items()}, file)


def test_a_checkpoint_rewritten_at_the_same_path_gives_the_new_output(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(DIGITS, ckpt)
    before = build_pipeline("digits", model_path=ckpt)(PROMPT, seed=0, **FAST)
    for file in (ckpt / "text_encoder").glob("*.safetensors"):
        perturb_in_place(file, 1)
    fresh = tmp_path / "copy"  # the rewritten checkpoint at a path the process has never seen
    shutil.copytree(ckpt, fresh)
    expected = build_pipeline("digits", model_path=fresh)(PROMPT, seed=0, **FAST).images
    assert float(np.abs(expected - before.images).max()) > 0.05  # the rewrite matters
    after = build_pipeline("digits", model_path=ckpt)(PROMPT, seed=0, **FAST)
    assert after.reused == []  # the text encodings of the old weights are not served either
    assert float(np.abs(after.images - expected).max()) <= 1e-5


def test_palette_images_with_different_palettes_are_different_keys():
    indices = bytes(range(16)) * 4
    one = Image.frombytes("P", (8, 8), indices)
    two = one.copy()
    one.putpalette([v for i in range(256) for v in (i, 0, 0)])
    two.putpalette([v for i in range(256) for v in (0, i, 0)])
    assert one.tobytes() == two.tobytes() and one.convert("RGB").tobytes() != two.convert("RGB").tobytes()
    assert fingerprint(one) != fingerprint(two)
    three = one.copy()
    three.info["transparency"] = 3  # decides which pixels come out transparent in RGBA
    assert fingerprint(three) != fingerprint(one)
    assert fingerprint(one) == fingerprint(one.copy())


def test_an_image_file_rewritten_with_the_same_size_and_mtime_gets_a_new_key(tmp_path):
    path = tmp_path / "input.bmp"  # BMP: the same size for any pixels of one shape
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    stat = os.stat(path)
    first = fingerprint(str(path))
    Image.new("RGB", (8, 8), (200, 20, 30)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    assert fingerprint(str(path)) != first


def scaled_encoding(scale: float) -> type:
    """A reusable text-encoding stage class; every call defines it anew with the same module and name."""
    from diffstage.stages import TextEncodingStage

    class ScaledEncoding(TextEncodingStage):
        def forward(self, req):
            req = super().forward(req)
            req.prompt_embeds = req.prompt_embeds * scale
            return req

    return ScaledEncoding


def test_a_redefined_stage_class_does_not_return_the_old_outputs():
    outputs, classes = [], [scaled_encoding(1.0), scaled_encoding(3.0)]
    assert {(c.__module__, c.__qualname__) for c in classes} == {(classes[0].__module__, classes[0].__qualname__)}
    for cls in classes:
        b = PipelineBuilder.from_yaml("digits")
        args = {k: v for k, v in b.stage("text_encoding").items() if k not in ("_target_", "_name_")}
        b.replace("text_encoding", cls, **args)
        outputs.append(b.build()(PROMPT, seed=0, **FAST))
    assert outputs[1].reused == []
    assert float(np.abs(outputs[0].images - outputs[1].images).max()) > 0.05


def test_a_callback_key_for_a_new_function_does_not_collide_with_a_freed_one():
    """Functions made and dropped in a loop land at freed addresses; their keys (kept, as the cache keeps
    them) must all differ, or a new callback would be served an old one's outputs."""
    from diffstage.callbacks import reads

    pipe = build_pipeline("digits")
    stage = pipe.stages[1]
    req = pipe.make_request(prompt=PROMPT, seed=0)
    for s in pipe.stages[:1]:
        req = s(req)
    settings = dict(stage.settings)
    keys, ids = [], set()
    for i in range(300):
        def combine(outputs, req, settings, negative, i=i):
            return {"prompt_embeds": outputs["prompt_embeds"] * i}

        stage.bind({"combine": reads()(combine)}, settings)
        keys.append(pipe.reuse.signature(stage, req, pipe.module_keys))
        ids.add(id(combine))
        del combine
    assert None not in keys
    assert len(set(keys)) == len(keys)


def run_digits(pipe, barrier=None):
    if barrier is not None:
        barrier.wait()
    return pipe(PROMPT, seed=0, **FAST).images


def test_two_pipelines_sharing_a_transformer_in_two_threads_give_their_solo_outputs():
    cached = build_pipeline("digits", overrides=["cache=teacache", "cache.threshold=100", "cache.warmup=1",
                                                 "reuse.enabled=false"])
    plain = build_pipeline("digits", overrides=["reuse.enabled=false"])
    assert cached.modules["transformer"] is plain.modules["transformer"]  # one module, two runs
    solo = {"cached": run_digits(cached), "plain": run_digits(plain)}
    assert float(np.abs(solo["cached"] - solo["plain"]).max()) > 0.01  # the cache changes the image
    for trial in range(12):
        barrier, results = threading.Barrier(2), {}

        def go(name, pipe):
            results[name] = run_digits(pipe, barrier)

        threads = [threading.Thread(target=go, args=(n, p)) for n, p in (("cached", cached), ("plain", plain))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for name in solo:
            diff = float(np.abs(results[name] - solo[name]).max())
            assert diff <= 1e-6, f"trial {trial}: the {name} pipeline's image is {diff:.3g} off its solo result"


def test_a_zero_reuse_budget_on_a_second_pipeline_leaves_reuse_on_for_the_first():
    first = build_pipeline("digits")
    first(PROMPT, seed=0, **FAST)
    second = build_pipeline("digits", overrides=["reuse.max_mb=0"])
    second("a handwritten digit seven", seed=0, **FAST)
    assert second("a handwritten digit seven", seed=1, **FAST).reused == []  # it stores nothing itself
    assert first(PROMPT, seed=1, **FAST).reused == ["1:TextEncodingStage"]


def test_a_new_session_shares_nothing_with_the_default_one():
    build_pipeline("digits")(PROMPT, seed=0, **FAST)
    session = Session()
    pipe = build_pipeline("digits", session=session)
    assert pipe.modules["transformer"] is not build_pipeline("digits").modules["transformer"]
    assert pipe(PROMPT, seed=1, **FAST).reused == []
    assert session.modules.load_count == 7 and len(session.reuse) == 1
    assert default_session() is default_session()


def test_a_rewritten_module_replaces_its_old_version_in_the_cache(tmp_path):
    """Only the rewritten module loads again, and the old weights are not kept beside the new ones."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(DIGITS, ckpt)
    session = Session()
    first = build_pipeline("digits", model_path=ckpt, session=session)
    for file in (ckpt / "vae").glob("*.safetensors"):
        perturb_in_place(file, 2)
    second = build_pipeline("digits", model_path=ckpt, session=session)
    assert session.modules.load_count == 7 + 1 and len(session.modules) == 7
    assert second.modules["vae"] is not first.modules["vae"]
    assert second.modules["transformer"] is first.modules["transformer"]


def test_each_entry_keeps_to_the_budget_of_the_pipeline_that_stored_it():
    from diffstage.reuse import ReuseCache

    cache = ReuseCache(max_bytes=3 * 400)
    cache.put("a", {"x": torch.zeros(100)})  # 400 bytes, the default budget (1200)
    cache.put("small", {"x": torch.zeros(100)}, max_bytes=400)
    cache.put("none", {"x": torch.zeros(1)}, max_bytes=0)  # a budget of 0 stores nothing
    assert cache.get("none") is None and len(cache) == 2
    cache.put("b", {"x": torch.zeros(100)})  # 400 bytes used after "small": past its budget, not past a's
    assert cache.get("small") is None and cache.get("a") is not None and cache.get("b") is not None
    for i in range(3):
        cache.put(i, {"x": torch.zeros(100)})  # a plain LRU of 1200 bytes for entries of one budget
    assert len(cache) == 3 and cache.get("a") is None and cache.get(2) is not None


def test_an_unhashable_callable_callback_makes_the_stage_run_not_fail():
    from diffstage.callbacks import reads

    class Combine:
        __hash__ = None  # defines equality by value, so instances cannot be dict keys

        def __eq__(self, other):
            return isinstance(other, Combine)

        def __call__(self, outputs, req, settings, negative):
            return {"prompt_embeds": outputs["prompt_embeds"]}

    pipe = build_pipeline("digits")
    combine = Combine()
    reads()(combine)
    pipe.stages[1].bind({"combine": combine}, dict(pipe.stages[1].settings))
    pipe(PROMPT, seed=0, **FAST)
    assert pipe(PROMPT, seed=1, **FAST).reused == []

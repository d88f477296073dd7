"""Stage-output reuse: stages whose inputs did not change are not run again, within a pipeline and across
the pipelines of one process (a sweep), and never when that could change the output."""
import numpy as np
import pytest
import torch

from diffstage import DiffstageError, build_pipeline
from diffstage.callbacks import reads
from diffstage.reuse import ReuseCache, Unhashable, fingerprint
from diffstage.session import default_session

PROMPT = "a handwritten digit four"


@pytest.fixture(autouse=True)
def empty_cache():
    default_session().reuse.clear()
    yield
    default_session().reuse.clear()


def test_a_seed_sweep_encodes_the_prompt_once_and_changes_nothing():
    pipe = build_pipeline("digits")
    first = pipe(PROMPT, seed=1, output_type="np")
    second = pipe(PROMPT, seed=2, output_type="np")
    assert first.reused == [] and second.reused == ["1:TextEncodingStage"]
    off = build_pipeline("digits", overrides=["reuse.enabled=false"])
    assert off.reuse is None
    plain = off(PROMPT, seed=2, output_type="np")
    assert plain.reused == [] and np.array_equal(plain.images, second.images)


def test_what_the_stage_reads_decides():
    pipe = build_pipeline("digits")
    pipe(PROMPT, seed=1)
    assert pipe("a handwritten digit five", seed=1).reused == []  # another prompt
    assert pipe(PROMPT, seed=1, true_cfg_scale=1.0).reused == []  # no CFG: no negative branch to encode
    assert pipe(PROMPT, seed=1, num_images_per_prompt=2).reused == []
    assert pipe(PROMPT, seed=3, true_cfg_scale=4.0).reused == ["1:TextEncodingStage"]  # still CFG, same texts


def test_pipelines_of_one_process_share_the_cache():
    build_pipeline("digits")(PROMPT, seed=0)
    again = build_pipeline("digits")  # a sweep builds one per job; the modules come from the loader's cache
    assert again(PROMPT, seed=1).reused == ["1:TextEncodingStage"]


def test_stages_that_draw_randomness_are_never_reused():
    pipe = build_pipeline("digits")
    pipe(PROMPT, seed=1)
    out = pipe(PROMPT, seed=1)
    assert out.reused == ["1:TextEncodingStage"]  # the latents are drawn again, even for the same seed


def test_a_callback_that_does_not_declare_its_reads_turns_reuse_off():
    from diffstage import PipelineBuilder

    def combine(outputs, req, settings, negative):  # gets the request, says nothing about what it reads
        return {"prompt_embeds": outputs["prompt_embeds"] * 1.0}

    b = PipelineBuilder.from_yaml("digits").set_args("text_encoding", combined_fields=["prompt_embeds"])
    b.set_callback("text_encoding", "combine", combine)
    pipe = b.build()
    pipe(PROMPT, seed=1)
    assert pipe(PROMPT, seed=2).reused == []
    b.set_callback("text_encoding", "combine", reads()(combine))  # declared (reads nothing): reused again
    pipe = b.build()
    pipe(PROMPT, seed=1)
    assert pipe(PROMPT, seed=2).reused == ["1:TextEncodingStage"]


def test_the_cache_keeps_to_its_budget():
    cache = ReuseCache(max_bytes=3 * 400)
    for i in range(5):
        cache.put(i, {"x": torch.zeros(100)})  # 400 bytes each
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) is not None
    cache.put("big", {"x": torch.zeros(1000)})  # larger than the budget: not kept
    assert cache.get("big") is None and len(cache) == 3


def test_fingerprints():
    a = torch.arange(6.0)
    assert fingerprint(a) == fingerprint(a.clone()) != fingerprint(a + 1)
    assert fingerprint(a.to(torch.bfloat16)) != fingerprint(a)
    assert fingerprint(["a", 1, None]) == fingerprint(["a", 1, None]) != fingerprint(("a", 1, None))
    with pytest.raises(Unhashable):
        fingerprint(torch.Generator())


class RecordingReads:
    """Records the Req fields a stage touches while it runs."""

    def __init__(self, stage):
        self.stage, self.seen = stage, set()

    def __enter__(self):
        original, seen = self.stage.forward, self.seen

        def forward(req):
            cls = type(req)

            class Recording(cls):
                def __getattribute__(self, name):
                    if name in cls.__dataclass_fields__:
                        seen.add(name)
                    return object.__getattribute__(self, name)

            object.__setattr__(req, "__class__", Recording)  # Req refuses unknown names, __class__ included
            try:
                return original(req)
            finally:
                object.__setattr__(req, "__class__", cls)

        self.stage.forward = forward
        return self

    def __exit__(self, *exc):
        del self.stage.forward


@pytest.mark.parametrize("model", ["digits", "sd3"])
def test_reusable_stages_declare_every_field_they_read(model, tmp_path):
    """A field a reusable stage reads without declaring it would make a stale reuse possible."""
    model_path = None
    if model == "sd3":
        from diffstage.models.sd3.tiny import build_tiny_sd3

        model_path = build_tiny_sd3(tmp_path / "sd3")
    pipe = build_pipeline(model, model_path=model_path, overrides=["reuse.enabled=false"])
    reusable = [s for s in pipe.stages if s.reusable]
    assert reusable
    for stage in reusable:
        with RecordingReads(stage) as rec:
            pipe(PROMPT, seed=0, negative_prompt="blurry", num_inference_steps=1, height=32, width=32)
        contract = stage.declared
        written = contract.writes | contract.optional_writes
        assert rec.seen - written <= contract.reads | contract.optional_reads, type(stage).__name__


@pytest.mark.parametrize("override, message", [
    ("reuse.enabled=no", "reuse.enabled must be true or false, got 'no'"),
    ("reuse.max_mb=-1", "reuse.max_mb must be a number of megabytes in [0, 2**40], got -1"),
    ("+reuse.size=3", "unknown key 'reuse.size'"),
])
def test_reuse_options_are_checked(override, message):
    with pytest.raises(DiffstageError, match=message.replace("[", r"\[").replace("*", r"\*")):
        build_pipeline("digits", overrides=[override])

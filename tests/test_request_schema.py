"""The open request schema: request fields a model YAML declares, state fields a stage declares,
and the Req fields callbacks declare they read (@reads), all checked before anything runs."""
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import line_of, problems_of
from test_cli import run
from diffstage import DiffstageError, Req, RequestError, build_pipeline, check_model
from diffstage.req import FieldSpec

FAST = ["sampling.num_inference_steps=2"]

CALLBACKS = '''
from diffstage import reads
from diffstage.models.flux import callbacks as flux


@reads("num_inference_steps", "shift_boost")
def sigmas(req, settings, scheduler):
    """FLUX's sigma schedule, bent by a request field this model declares."""
    return flux.sigmas(req, settings, scheduler) ** (1.0 + req.shift_boost)


@reads("num_inference_steps", "output")
def sigmas_too_early(req, settings, scheduler):
    return None


@reads("num_inference_steps", "txt_mask")
def sigmas_unknown_field(req, settings, scheduler):
    return None
'''

YAML = '''
extends: digits
name: boosted
request_fields:
  shift_boost: {type: float, default: 0.0, ge: -1, le: 1, doc: added to the exponent of the sigma schedule}
pipeline_config:
  callbacks:
    timestep_preparation:
      sigmas: schema_callbacks.{sigmas}
'''


@pytest.fixture
def boosted(tmp_path, monkeypatch):
    """A model YAML (digits + a declared request field + a callback reading it) and its callback module."""
    (tmp_path / "schema_callbacks.py").write_text(CALLBACKS)
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(sigmas: str = "sigmas", extra: str = ""):
        path = tmp_path / f"boosted_{sigmas}.yaml"
        path.write_text(textwrap.dedent(YAML).replace("{sigmas}", sigmas) + extra)
        return path

    return make


def test_declared_request_field_from_python(boosted):
    checked = check_model(boosted(), allowlist=["schema_callbacks"])
    assert "shift_boost" in checked.req_cls.request_fields() and "shift_boost" not in Req.request_fields()
    pipe = build_pipeline(str(boosted()), overrides=FAST + ["allowlist=[schema_callbacks]"])
    default = pipe("a handwritten digit four", seed=0, output_type="np").images
    same = pipe("a handwritten digit four", seed=0, shift_boost=0.0, output_type="np").images
    moved = pipe("a handwritten digit four", seed=0, shift_boost=0.8, output_type="np").images
    assert (default == same).all() and not (default == moved).all()
    with pytest.raises(RequestError, match=r"shift_boost must be a number >= -1 and <= 1, got 5"):
        pipe("a handwritten digit four", seed=0, shift_boost=5)
    with pytest.raises(RequestError, match=r"unknown request argument 'shift_bost' \(did you mean 'shift_boost'\?\)"):
        pipe("a handwritten digit four", seed=0, shift_bost=0.5)


def test_declared_request_field_from_the_cli(boosted, tmp_path):
    env = {"PYTHONPATH": str(tmp_path)}
    r = run("generate", f"model={boosted()}", "allowlist=[schema_callbacks]", "+sampling.shift_boost=0.5",
            f"hydra.run.dir={tmp_path / 'run'}", *FAST, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "image.png").is_file()
    r = run("generate", f"model={boosted()}", "allowlist=[schema_callbacks]", "+sampling.shift_boost=2",
            f"hydra.run.dir={tmp_path / 'run2'}", *FAST, env=env)
    assert r.returncode == 2 and "shift_boost must be a number >= -1 and <= 1, got 2" in r.stderr, r.stderr


def test_sampling_key_no_stage_reads_is_an_error(tmp_path):
    r = run("generate", "+sampling.num_frames=9", f"hydra.run.dir={tmp_path}", *FAST)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown key 'sampling.num_frames'" in r.stderr and "(no stage or callback of this model reads it)" \
        in r.stderr, r.stderr


def test_callback_reading_a_field_nothing_writes_yet(boosted):
    path = boosted("sigmas_too_early")
    (problem,) = problems_of(path, allowlist=["schema_callbacks"])
    assert problem.key == "pipeline_config.callbacks.timestep_preparation.sigmas"
    assert problem.line == line_of(path, "sigmas: schema_callbacks")
    assert problem.message == ("callback 'timestep_preparation.sigmas' reads 'output' but no earlier stage writes it "
                               "and the request does not supply it")
    assert problem.hint == "stages[5] writes it: move that stage before stages[3]"


def test_callback_reading_an_unknown_field(boosted):
    path = boosted("sigmas_unknown_field")
    (problem,) = problems_of(path, allowlist=["schema_callbacks"])
    assert (problem.key, problem.line) == ("pipeline_config.callbacks.timestep_preparation.sigmas",
                                           line_of(path, "sigmas: schema_callbacks"))
    assert problem.message == "callback 'timestep_preparation.sigmas' reads 'txt_mask', which is not a Req field"


def test_callback_reads_join_the_stage_contract(boosted):
    checked = check_model(boosted(), allowlist=["schema_callbacks"])
    timesteps = next(p for p in checked.plan if p.cls.__name__ == "TimestepPreparationStage")
    assert "shift_boost" in timesteps.contract.reads
    denoise = next(p for p in checked.plan if p.cls.__name__ == "DenoisingStage")
    assert {"image_position_ids", "latents"} <= denoise.contract.reads  # FLUX's model_inputs declares them


@pytest.mark.parametrize("fields, needle", [
    ("  height: {type: int}\n", "'height' is already a standard Req field; declare only new names"),
    ("  2x: {type: int}\n", "request field name '2x' must be a Python identifier"),
    ("  n: {type: int, default: 0, ge: 1}\n", "default must be an integer >= 1, got 0"),
    ("  n: {type: integer}\n", "Input should be 'int', 'float', 'str', 'text', 'bool', 'image' or 'any'"),
])
def test_bad_request_field_declarations(boosted, fields, needle):
    path = boosted(extra="request_fields:\n" + fields)
    problems = problems_of(path, allowlist=["schema_callbacks"])
    assert any(needle in p.message and p.key.startswith("request_fields") for p in problems), problems


def test_misspelt_field_in_a_stage_argument(flux_yaml_variant):
    path = flux_yaml_variant(("conditioning: [prompt_embeds, pooled_prompt_embeds]",
                              "conditioning: [prompt_embeds, pooled_prompt_embed]"))
    problems = [(p.key, p.message, p.hint) for p in problems_of(path)]
    assert problems == [("stages[4]", f"reads '{name}', which is not a Req field", f"did you mean '{name}s'?")
                        for name in ("pooled_prompt_embed", "negative_pooled_prompt_embed")]


def test_a_stage_declares_the_fields_it_adds(tmp_path, monkeypatch, flux_yaml_variant):
    (tmp_path / "schema_stages.py").write_text(textwrap.dedent('''
        from diffstage import PipelineStage

        class TextMask(PipelineStage):
            reads = ("prompt",)
            writes = ("text_mask",)
            declares = {"text_mask": "1 for real tokens, 0 for padding"}

            def forward(self, req):
                req.text_mask = [1] * len(req.prompts())
                return req

        class Undeclared(PipelineStage):
            reads = ("prompt",)
            writes = ("text_mask",)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = "  - _target_: diffstage.stages.TextEncodingStage\n"
    path = flux_yaml_variant((stage, "  - _target_: schema_stages.TextMask\n" + stage))
    checked = check_model(path, allowlist=["schema_stages"])
    assert "text_mask" in checked.req_cls.state_fields()
    assert checked.req_cls.extra_fields() == [FieldSpec("text_mask", "state", "1 for real tokens, 0 for padding")]
    path = flux_yaml_variant((stage, "  - _target_: schema_stages.Undeclared\n" + stage), name="undeclared.yaml")
    (problem,) = problems_of(path, allowlist=["schema_stages"])
    assert problem.message == "writes 'text_mask', which is not a Req field"
    assert problem.hint == "a stage that adds a field lists it in its contract's `declares`"


def test_req_refuses_fields_it_does_not_have():
    req = Req(prompt="x")
    with pytest.raises(AttributeError, match=r"Req has no field 'promt' \(did you mean 'prompt'\?\)"):
        req.promt = "y"
    cls = Req.with_fields([FieldSpec("num_frames", "request", "frames", "int", 9, 1, 1024)])
    req = cls(prompt="x")
    assert req.num_frames == 9 and isinstance(req, Req) and req.declared_field_problems() == []
    req.num_frames = 0
    assert req.declared_field_problems() == ["num_frames must be an integer >= 1 and <= 1024, got 0"]
    with pytest.raises(ValueError, match="height is already a standard Req field; declare only new names"):
        Req.with_fields([FieldSpec("height", "request")])


def test_several_bad_encoder_entries_are_reported_at_once(flux_yaml_variant):
    path = flux_yaml_variant(
        ("        output: pooler_output\n", "        output: pooler_output\n        colour: red\n"),
        ("        field: prompt_embeds\n", "        field: 7\n        max_length: 0\n"))
    problems = sorted((p.key, p.message) for p in problems_of(path))
    assert [key for key, _ in problems] == ["stages[1].encoders[0].colour", "stages[1].encoders[1].field",
                                            "stages[1].encoders[1].max_length"]


def test_image_fields_take_images_or_paths():
    spec = FieldSpec("image", "request", type="image")
    assert spec.problems(__file__) == [] and spec.problems(torch.zeros(3, 8, 8)) == []
    assert spec.problems("no/such.png") == ["image: no image file at 'no/such.png'"]
    assert spec.problems(Path(__file__)) == [] and spec.problems(Path("no/such.png")) != []
    message = "image must be an image (a PIL image, a [C, H, W] tensor or a file path), got"
    assert spec.problems(5) == [f"{message} 5"]
    assert spec.problems(torch.zeros(1, 3, 8, 8))[0].startswith(message)  # a batch is not one image


def test_a_stage_may_not_redeclare_a_field(tmp_path, monkeypatch, flux_yaml_variant):
    (tmp_path / "redeclaring_stages.py").write_text(textwrap.dedent('''
        from diffstage import PipelineStage

        class Redeclares(PipelineStage):
            reads = ("prompt",)
            writes = ("latents",)
            declares = {"latents": "mine", "2x": "not a name"}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = "  - _target_: diffstage.stages.TextEncodingStage\n"
    path = flux_yaml_variant((stage, "  - _target_: redeclaring_stages.Redeclares\n" + stage))
    messages = sorted(p.message for p in problems_of(path, allowlist=["redeclaring_stages"]))
    assert messages == ["declares the new field '2x', which is not a Python identifier",
                        "declares the new field 'latents', which is already a Req field"]


def test_reads_takes_field_names():
    from diffstage import reads

    with pytest.raises(TypeError, match=r"@reads takes Req field names, got \('latents', 'not a name'\)"):
        reads("latents", optional=("not a name",))


def test_misspelt_sampling_key_gets_a_did_you_mean():
    with pytest.raises(DiffstageError) as e:
        build_pipeline("digits", overrides=["+sampling.heigth=32"])
    assert "unknown key 'sampling.heigth' (did you mean 'height'?)" in str(e.value)
    assert "no stage or callback" not in str(e.value)

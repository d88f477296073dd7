"""The static contract check: each kind of failure, its message, and all problems at once."""
import sys

import pytest

from diffstage import SpecError, check_model

from conftest import line_of, problems_of



def test_missing_stage_input_names_producer(flux_yaml_variant):
    # Drop the latent stage: timesteps and denoising then read `latents` that nobody writes.
    path = flux_yaml_variant(("  - _target_: diffstage.stages.LatentPreparationStage\n", ""),
                             ("      position_ids: diffstage.models.flux.callbacks.position_ids\n", ""),
                             ("      latent_shape: diffstage.models.flux.callbacks.latent_shape\n", ""),
                             ("      pack: diffstage.models.flux.callbacks.pack\n", ""),
                             ("    latent_preparation:\n", ""))
    problems = problems_of(path)
    reads = [p for p in problems if "reads 'latents'" in p.message]
    assert len(reads) >= 2  # TimestepPreparation and Denoising both need it
    p = reads[0]
    assert p.key == "stages[2]" and p.stage == "TimestepPreparationStage"
    assert p.line == line_of(path, "TimestepPreparationStage")
    assert "no earlier stage writes it and the request does not supply it" in p.message
    assert "LatentPreparationStage" in p.hint


def test_stage_order_problem_suggests_moving(flux_yaml_variant):
    path = flux_yaml_variant(
        ("  - _target_: diffstage.stages.LatentPreparationStage\n  - _target_: diffstage.stages.TimestepPreparationStage\n",
         "  - _target_: diffstage.stages.TimestepPreparationStage\n  - _target_: diffstage.stages.LatentPreparationStage\n"))
    (p,) = problems_of(path)
    assert p.stage == "TimestepPreparationStage" and "reads 'latents'" in p.message
    assert p.hint == "stages[3] writes it: move that stage before stages[2]"


def test_unknown_callback_with_suggestion(flux_yaml_variant):
    path = flux_yaml_variant(("      mu: diffstage", "      muu: diffstage"))
    (p,) = problems_of(path)
    assert p.key == "pipeline_config.callbacks.timestep_preparation.muu"
    assert p.line == line_of(path, "muu:")
    assert "callback 'muu' is not called by any stage" in p.message
    assert "did you mean 'mu'?" in p.hint


def test_unknown_callback_group(flux_yaml_variant):
    path = flux_yaml_variant(("    decoding:\n", "    decodeing:\n"))
    (p,) = problems_of(path)
    assert p.key == "pipeline_config.callbacks.decodeing"
    assert "no stage in this pipeline calls callbacks of group 'decodeing'" in p.message
    assert p.hint == "did you mean 'decoding'?"


def test_missing_required_callback(flux_yaml_variant):
    path = flux_yaml_variant(("      model_inputs: diffstage.models.flux.callbacks.model_inputs\n", ""))
    (p,) = problems_of(path)
    assert p.message == "missing required callback 'denoising.model_inputs'"
    assert p.stage == "DenoisingStage" and "model_inputs(req, settings, transformer, negative)" in p.hint


def test_callback_group_that_is_not_a_mapping(flux_yaml_variant):
    """A group holding a number is one problem, of its type; not a crash over its required callbacks."""
    path = flux_yaml_variant(("    latent_preparation:\n      latent_shape: diffstage.models.flux.callbacks.latent_shape\n"
                              "      pack: diffstage.models.flux.callbacks.pack\n"
                              "      position_ids: diffstage.models.flux.callbacks.position_ids\n",
                              "    latent_preparation: 3\n"))
    problems = problems_of(path)
    assert [p.key for p in problems] == ["pipeline_config.callbacks.latent_preparation"], problems
    assert "valid dictionary" in problems[0].message or "mapping" in problems[0].message, problems[0].message


def test_callback_that_does_not_resolve_or_has_wrong_signature(flux_yaml_variant):
    path = flux_yaml_variant(("callbacks.mu", "callbacks.mu_nope"),
                             ("callbacks.pack", "callbacks.vae_scale_factor"))
    problems = problems_of(path)
    msgs = "\n".join(str(p) for p in problems)
    assert "has no attribute 'mu_nope'" in msgs
    assert "cannot be called as pack(latents, req, settings)" in msgs


def test_unknown_stage_argument(flux_yaml_variant):
    path = flux_yaml_variant(("    multiple_of: 16", "    multiple_off: 16"))
    (p,) = problems_of(path)
    assert p.key == "stages[0].multiple_off" and p.stage == "InputValidationStage"
    assert p.message == "unknown argument 'multiple_off'" and p.hint == "did you mean 'multiple_of'?"
    assert p.line == line_of(path, "multiple_off")


def test_stage_argument_type_error_nested(flux_yaml_variant):
    path = flux_yaml_variant(("        output: pooler_output\n", "        output: pooler_output\n        max_length: lots\n"))
    (p,) = problems_of(path)
    assert p.key == "stages[1].encoders[0].max_length"
    assert "lots" in p.message and p.line == line_of(path, "max_length: lots")


def test_stage_argument_literal_checked(flux_yaml_variant):
    path = flux_yaml_variant(("cfg_scale_field: true_cfg_scale", "cfg_scale_field: cfg"))
    (p,) = problems_of(path)
    assert p.key == "stages[0].cfg_scale_field" and "'cfg'" in p.message


def test_unknown_module_reference_and_unused_module(flux_yaml_variant):
    path = flux_yaml_variant(("      - text_encoder: text_encoder_2 ", "      - text_encoder: text_encodr_2 "))
    problems = problems_of(path)
    unknown = [p for p in problems if "unknown module" in p.message]
    assert unknown[0].key == "stages[1].encoders[1].text_encoder"
    assert unknown[0].hint == "did you mean 'text_encoder_2'?"
    unused = [p for p in problems if "listed but no stage uses it" in p.message]
    assert unused[0].key == "modules.text_encoder_2"


def test_unknown_stage_target(flux_yaml_variant):
    path = flux_yaml_variant(("diffstage.stages.DecodingStage", "diffstage.stages.DecodeStage"))
    problems = problems_of(path)
    p = problems[0]
    assert p.key == "stages[5]._target_" and "unknown stage" in p.message
    assert p.hint == "did you mean 'diffstage.stages.DecodingStage'?"


def test_target_that_is_not_a_stage(flux_yaml_variant):
    path = flux_yaml_variant(("diffstage.stages.DecodingStage", "torch.nn.Linear"))
    problems = problems_of(path)
    assert any("'torch.nn.Linear' is not a PipelineStage subclass" in p.message for p in problems)


def test_every_problem_reported_at_once(flux_yaml_variant):
    path = flux_yaml_variant(
        ("stages:\n", "stagse: 1\nstages:\n"),                       # wrong key
        ("  height: 1024", "  height: tall"),                          # type error
        ("      mu: diffstage", "      muu: diffstage"),               # unknown callback
        ("  - _target_: diffstage.stages.LatentPreparationStage\n  - _target_: diffstage.stages.TimestepPreparationStage\n",
         "  - _target_: diffstage.stages.TimestepPreparationStage\n  - _target_: diffstage.stages.LatentPreparationStage\n"),
        ("    multiple_of: 16", "    multiple_off: 16"),              # unknown stage argument
    )
    problems = problems_of(path)
    text = "\n".join(map(str, problems))
    for expected in ("unknown key 'stagse'", "sampling.height", "callback 'muu'", "reads 'latents'",
                     "unknown argument 'multiple_off'"):
        assert expected in text
    assert all(p.file == str(path) and p.line for p in problems)
    assert [p.line for p in problems] == sorted(p.line for p in problems)


def test_error_text_format(flux_yaml_variant):
    path = flux_yaml_variant(("    multiple_of: 16", "    multiple_off: 16"))
    with pytest.raises(SpecError) as e:
        check_model(path)
    line = line_of(path, "multiple_off")
    assert str(e.value) == (
        "1 problem in model spec:\n"
        f"  - {path}:{line}: stages[0].multiple_off: [InputValidationStage] unknown argument 'multiple_off' "
        "(did you mean 'multiple_of'?)")


def test_disallowed_stage_target_is_not_imported(flux_yaml_variant, tmp_path, monkeypatch):
    (tmp_path / "evil_stage_mod.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = flux_yaml_variant(("diffstage.stages.DecodingStage", "evil_stage_mod.Stage"))
    problems = problems_of(path)
    assert any("'evil_stage_mod.Stage' is outside the import allowlist" in p.message and p.key == "stages[5]._target_"
               for p in problems)
    assert "evil_stage_mod" not in sys.modules and not (tmp_path / "evil_stage_mod.ran").exists()


def test_os_system_target_refused(flux_yaml_variant):
    path = flux_yaml_variant(("diffstage.stages.DecodingStage", "os.system"),
                             ("callbacks.unpack", "callbacks.unpack\n      denormalize: builtins.eval"))
    problems = problems_of(path)
    text = "\n".join(map(str, problems))
    assert "'os.system' is outside the import allowlist" in text
    assert "'builtins.eval' is outside the import allowlist" in text


def test_user_allowlist_extends(flux_yaml_variant, tmp_path, monkeypatch):
    (tmp_path / "my_callbacks.py").write_text(
        "from diffstage.models.flux.callbacks import mu as flux_mu\n"
        "def mu(req, settings, scheduler):\n    return flux_mu(req, settings, scheduler)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = flux_yaml_variant(("diffstage.models.flux.callbacks.mu", "my_callbacks.mu"))
    problems = problems_of(path)
    assert "outside the import allowlist" in problems[0].message
    checked = check_model(path, allowlist=["my_callbacks"])
    assert checked.spec.pipeline_config.callbacks["timestep_preparation"]["mu"] == "my_callbacks.mu"


def test_module_target_checked_statically(flux_yaml_variant):
    path = flux_yaml_variant(("  vae:\n", "  vae: {_target_: os.system}\n"),
                             ("  scheduler:\n", "  scheduler: {_target_: torch.nn.Linear}\n"),
                             ("  tokenizer:\n", "  tokenizer: {_target_: transformers.NoSuchTokenizer}\n"),
                             ("  text_encoder:\n", "  text_encoder: {_target_: diffusers.DiffusionPipeline}\n"))
    problems = {p.key: p for p in problems_of(path)}
    assert "'os.system' is outside the import allowlist" in problems["modules.vae._target_"].message
    assert problems["modules.scheduler._target_"].message == (
        "module 'scheduler': 'torch.nn.modules.linear.Linear' cannot load a module: expected a torch model class, "
        "a scheduler, a tokenizer or a processor with from_pretrained")
    assert "cannot resolve module class" in problems["modules.tokenizer._target_"].message
    assert problems["modules.vae._target_"].line == line_of(path, "_target_: os.system")
    assert "cannot load a module" in problems["modules.text_encoder._target_"].message  # a whole pipeline


def test_pipeline_must_write_output(flux_yaml_variant):
    path = flux_yaml_variant(("  - _target_: diffstage.stages.DecodingStage\n", ""),
                             ("    decoding:\n      unpack: diffstage.models.flux.callbacks.unpack\n", ""))
    problems = problems_of(path)
    assert [p.message for p in problems] == ["no stage writes 'output', so the pipeline would produce nothing"]
    assert problems[0].hint == "end the pipeline with a stage that writes it, e.g. DecodingStage"

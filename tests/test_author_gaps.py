"""Model-author gaps of issue 22 outside the stages: validate shows optional reads and writes, a declared
request field may default to a list, and an allowlisted package Python cannot import says what to do."""
import pytest

from diffstage import DiffstageError, check_model
from diffstage.cli.inspection import validate_command


def test_validate_lists_optional_reads_and_writes(capsys):
    validate_command(["sd15"])
    lines = capsys.readouterr().out.splitlines()
    text = next(line for line in lines if "TextEncodingStage" in line)
    assert text == ("  stages[1] TextEncodingStage: reads ['do_cfg', 'prompt'] (+ optional ['max_sequence_length', "
                    "'negative_prompt', 'num_images_per_prompt', 'prompt_2']) -> writes ['prompt_embeds'] "
                    "(+ optional ['negative_prompt_embeds'])")
    timesteps = next(line for line in lines if "TimestepPreparationStage" in line)
    assert "reads ['latents', 'num_inference_steps'] -> writes" in timesteps  # no optional reads: nothing shown


def test_request_field_may_default_to_a_list(flux_yaml_variant):
    path = flux_yaml_variant(("sampling:\n", "request_fields:\n  crops: {type: any, default: [0, 0], doc: a pair}\n"
                                             "sampling:\n"))
    req_cls = check_model(path).req_cls
    a, b = req_cls(), req_cls()
    a.crops.append(1)  # each request has its own copy
    assert b.crops == [0, 0] and a.crops == [0, 0, 1]


def test_allowlisted_package_that_is_not_importable(flux_yaml_variant, capsys):
    path = flux_yaml_variant(("diffstage.models.flux.callbacks.mu", "my_author_pkg.callbacks.mu"))
    with pytest.raises(SystemExit) as e:
        validate_command([str(path), "--allow", "my_author_pkg"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("pipeline_config.callbacks.timestep_preparation.mu: cannot resolve callback: cannot resolve "
            "'my_author_pkg.callbacks.mu': no module named 'my_author_pkg' can be imported; a package of your own "
            "must be installed (pip install -e DIR) or on PYTHONPATH, besides being in the allowlist") in err
    with pytest.raises(DiffstageError):
        check_model(path, allowlist=["diffstage.", "my_author_pkg"])


def test_shipped_reusable_stages_declare_what_their_callbacks_read():
    """A callback that gets the request but does not say what it reads (@reads) turns reuse off for its stage:
    every request would rerun, e.g., a text encoder. No shipped YAML may do that by omission."""
    import inspect

    from diffstage.callbacks import READS
    from diffstage.resolve import resolve
    from diffstage.models_dir import available_models

    undeclared = []
    for name in sorted(available_models()):
        checked = check_model(name)
        for planned in checked.plan:
            if not planned.cls.reusable:
                continue
            group = checked.spec.pipeline_config.callbacks.get(planned.cls.callback_group(), {})
            specs = {s.name: s for s in planned.cls.callback_specs}
            for callback, path in group.items():
                fn = resolve(path)
                if "req" in specs[callback].params and not hasattr(inspect.unwrap(fn), READS):
                    undeclared.append(f"{name}: {planned.cls.callback_group()}.{callback}")
    assert undeclared == []


def test_a_checkpoint_saved_without_a_module_the_yaml_uses(tmp_path):
    import json
    import shutil

    from diffstage import build_pipeline
    from diffstage.errors import LoadError
    from diffstage.models_dir import model_yaml

    folder = tmp_path / "ckpt"
    shutil.copytree(model_yaml("digits").parent.parent / "models" / "digits" / "checkpoint", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    with pytest.raises(LoadError, match=r"module 'text_encoder': this checkpoint has none \(model_index.json lists it "
                                        r"as \[null, null\]\), but model 'digits' uses it; use a YAML without it for "
                                        r"this checkpoint"):
        build_pipeline("digits", model_path=folder)

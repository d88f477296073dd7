"""What a newcomer meets (issue 18, items 12-18): valid input that was refused, command-line keys, hints on the
first mistake, settings a model ignores, and the README's own commands."""
import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, assert_matches_diffusers
from diffstage import build_pipeline
from diffstage.errors import DiffstageError


# --- 12: a tokenizer's model_max_length is advice; the encoder's position table is the limit -----------------

@pytest.fixture(scope="module")
def qwen_short_tokenizer(tmp_path_factory):
    """The tiny Qwen-Image checkpoint with a tokenizer that advises 1024 tokens, below the YAML's fixed 1058."""
    from diffstage.models.qwen_image.tiny import build_tiny_qwen_image

    ckpt = tmp_path_factory.mktemp("qwen") / "short-tokenizer"
    shutil.copytree(build_tiny_qwen_image(tmp_path_factory.mktemp("ckpt") / "tiny-qwen-image"), ckpt)
    config = ckpt / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 1024}))
    return ckpt


def test_qwen_image_builds_with_a_tokenizer_advising_fewer_tokens_and_matches_diffusers(qwen_short_tokenizer):
    from diffusers import QwenImagePipeline

    ref = QwenImagePipeline.from_pretrained(qwen_short_tokenizer, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    assert ref.tokenizer.model_max_length == 1024
    pipe = build_pipeline("qwen_image", model_path=qwen_short_tokenizer)
    common = dict(negative_prompt="blurry", true_cfg_scale=4.0, height=32, width=48, num_inference_steps=3,
                  output_type="np")
    expected = ref("a red fox in the snow", generator=torch.Generator("cpu").manual_seed(3), **common).images
    ours = pipe("a red fox in the snow", seed=3, **common).images
    assert_matches_diffusers(ours, expected, "qwen_image/short tokenizer", 1e-4)  # the parity tests' tolerance


def test_fixed_max_length_beyond_the_encoders_position_table_is_refused(qwen_short_tokenizer, tmp_path):
    ckpt = tmp_path / "short-positions"
    shutil.copytree(qwen_short_tokenizer, ckpt)
    config_path = ckpt / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["max_position_embeddings"] = 1000
    config_path.write_text(json.dumps(config))
    with pytest.raises(DiffstageError, match=r"encoders\[0\]\.max_length is 1058, but this encoder handles at most "
                                             r"1000 tokens \(its max_position_embeddings\)"):
        build_pipeline("qwen_image", model_path=ckpt)


# --- 13 and 16: command-line keys --------------------------------------------------------------------------

from test_cli import run  # noqa: E402


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from diffstage.models.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("ckpt") / "tiny-wan")


def test_a_models_request_field_is_set_like_the_standard_ones(tiny_wan, tmp_path):
    from diffstage.video import read_mp4

    r = run("generate", "model=wan_t2v", f"model_path={tiny_wan}", "sampling.num_frames=9", f"hydra.run.dir={tmp_path}",
            "sampling.num_inference_steps=2", "sampling.height=32", "sampling.width=32",
            "sampling.max_sequence_length=16")
    assert r.returncode == 0, r.stderr
    frames, _ = read_mp4(tmp_path / "video.mp4")
    assert frames.shape == (9, 32, 32, 3)


def test_a_model_field_from_python_overrides_too(tiny_wan):
    pipe = build_pipeline("wan_t2v", model_path=tiny_wan, overrides=["sampling.num_frames=9"])
    assert pipe.defaults["num_frames"] == 9


def test_an_unknown_sampling_key_is_still_refused_with_a_did_you_mean(tmp_path):
    r = run("generate", "sampling.num_inference_stesp=2", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("unknown key 'sampling.num_inference_stesp' (did you mean 'num_inference_steps'?)"
            in r.stderr)
    with pytest.raises(DiffstageError, match=r"unknown key 'sampling.heigth' \(did you mean 'height'\?\)"):
        build_pipeline("digits", overrides=["sampling.heigth=32"])


@pytest.mark.parametrize("command", ["generate", "sheet"])
def test_a_key_typo_gets_the_did_you_mean_the_first_time(command, tmp_path):
    r = run(command, "promt=a handwritten digit four", "runtime.devcie=cpu", "cache.thresold=0.2",
            f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown key 'promt' (did you mean 'prompt'?)" in r.stderr
    assert "unknown key 'runtime.devcie' (did you mean 'device'?)" in r.stderr
    assert "unknown key 'cache.thresold' (did you mean 'threshold'?)" in r.stderr
    assert "+promt" not in r.stderr and "To append" not in r.stderr
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_a_prompt_without_a_key_gets_a_hint(tmp_path):
    r = run("generate", "a handwritten digit four", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "LexerNoViableAlt" not in r.stderr
    assert ("error: 'a handwritten digit four' is not an override (KEY=VALUE); to set the prompt, write "
            "prompt=\"a handwritten digit four\"") in r.stderr


# --- 15: a setting the model ignores says so ---------------------------------------------------------------

IGNORED = ("sampling.guidance_scale has no effect on model 'digits': nothing in its pipeline reads it (its "
           "classifier-free guidance scale is true_cfg_scale)")


def test_a_setting_nothing_reads_is_named_with_the_reason():
    from diffstage.setting_use import IgnoredSettingWarning

    pipe = build_pipeline("digits", overrides=["sampling.num_inference_steps=2", "sampling.guidance_scale=4"])
    with pytest.warns(IgnoredSettingWarning) as caught:
        out = pipe("a handwritten digit four", seed=0)
    assert [str(w.message) for w in caught] == [IGNORED]
    assert out.ignored == {"guidance_scale": IGNORED}


def test_settings_that_are_read_give_no_warning(tiny_flux_dev, recwarn):
    pipe = build_pipeline("digits", overrides=["sampling.num_inference_steps=2", "sampling.true_cfg_scale=2"])
    assert pipe("a handwritten digit four", seed=0, negative_prompt="blurry").ignored == {}
    # FLUX.1-dev embeds guidance_scale in its transformer: read there
    flux = build_pipeline("flux", model_path=tiny_flux_dev, overrides=[
        "sampling.num_inference_steps=1", "sampling.height=32", "sampling.width=32", "sampling.max_sequence_length=16"])
    assert flux("a red fox", seed=0, guidance_scale=2.5).ignored == {}
    assert not [w for w in recwarn if "no effect" in str(w.message)]


def test_a_sweep_over_an_ignored_setting_warns_once(tmp_path):
    r = run("generate", "-m", "seed=0,1", "sampling.guidance_scale=2,4", "sampling.num_inference_steps=2",
            f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("has no effect") == 1 and f"warning: {IGNORED}\n" in r.stderr


# --- 17: outputs into folders that do not exist yet --------------------------------------------------------

def test_schema_output_creates_its_folder(tmp_path):
    r = run("schema", "--output", "my_models/diffstage.schema.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "my_models" / "diffstage.schema.json"
    assert r.stdout.strip() == str(out) and json.loads(out.read_text())["title"]
    r = run("schema", "--output", str(out / "under_a_file.json"))  # a folder that cannot be made: said clearly
    assert r.returncode == 2 and r.stderr.startswith(f"error: cannot write into '{out}'")


# --- 18: the docs and the code agree -------------------------------------------------------------------------

def test_models_shows_the_fallback_runs_any_task():
    r = run("models")
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()}
    assert r.returncode == 0 and rows["diffusers_auto"] == "any" and rows["digits"] == "t2i"
    readme = (REPO / "README.md").read_text()
    assert "| `diffusers_auto` | any |" in readme


def test_readme_names_every_request_field_type():
    from diffstage.req import FIELD_TYPES

    readme = (REPO / "README.md").read_text()
    start = readme.index("Types are ")
    sentence = readme[start:readme.index(" bound them", start)]
    assert [t for t in FIELD_TYPES if f"`{t}`" not in sentence] == []


def test_readme_example_outputs_are_ignored_by_git():
    outputs = ["outputs/2026-01-01/image.png", "multirun/x/image.png", "sweeps/cfg/sweep.jsonl",
               "my_models/diffstage.schema.json", "graph.png", "fox.png", "my_digits.yaml"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=REPO, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(outputs)

"""What a newcomer meets (issue 18, items 12-18): valid input that was refused, command-line keys, hints on the
first mistake, settings a model ignores, and the README's own commands."""
import json
import shutil

import pytest
import torch

from conftest import assert_matches_diffusers
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

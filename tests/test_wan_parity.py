"""Wan2.1 text-to-video: diffstage vs diffusers.WanPipeline on a tiny random checkpoint, and the MP4 the CLI writes."""
import numpy as np
import pytest
import torch

from conftest import assert_matches_diffusers
from test_cli import run
from diffstage import build_pipeline

TOL = 1e-4
CASES = {
    "cfg": dict(prompt="a red fox in the snow", negative_prompt="blurry", guidance_scale=4.0),
    "cfg_empty_negative": dict(prompt="a red fox in the snow", guidance_scale=4.0),
    "no_cfg": dict(prompt="a red fox", guidance_scale=1.0),
    "batch": dict(prompt=["a red fox", "a blue cat"], negative_prompt=["blurry", "dark"], guidance_scale=4.0,
                  num_images_per_prompt=2),
}
SMALL = ["sampling.num_inference_steps=3", "sampling.height=32", "sampling.width=48",
         "sampling.max_sequence_length=16", "+sampling.num_frames=5"]


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from diffstage.models.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("ckpt") / "tiny-wan")


@pytest.fixture(scope="module")
def pipes(tiny_wan):
    from diffusers import WanPipeline

    ref = WanPipeline.from_pretrained(tiny_wan, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref, build_pipeline("wan_t2v", model_path=tiny_wan)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_diffusers(pipes, case):
    ref, pipe = pipes
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    n = kw.pop("num_images_per_prompt", 1)
    common = dict(height=32, width=48, num_frames=5, num_inference_steps=3, max_sequence_length=16,
                  output_type="np", **kw)
    expected = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), num_videos_per_prompt=n, **common).frames
    ours = pipe(prompt, seed=3, num_images_per_prompt=n, **common).frames
    assert ours.shape[1:] == (5, 32, 48, 3)  # [B, F, H, W, C]
    assert_matches_diffusers(ours, expected, f"wan_t2v/{case}", TOL)


def test_pil_output_is_one_frame_list_per_video(pipes):
    _, pipe = pipes
    videos = pipe("a red fox", seed=0, num_frames=9, height=32, width=32, num_inference_steps=2,
                  max_sequence_length=16).frames
    assert len(videos) == 1 and len(videos[0]) == 9 and videos[0][0].size == (32, 32)


def test_generate_writes_a_playable_mp4(tiny_wan, tmp_path):
    from diffstage.video import read_mp4

    r = run("generate", "model=wan_t2v", f"model_path={tiny_wan}", "prompt=a red fox", "seed=1",
            f"hydra.run.dir={tmp_path / 'run'}", *SMALL)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "run" / "video.mp4"
    assert r.stdout.strip().splitlines()[-1] == str(path)
    frames, info = read_mp4(path)
    assert frames.shape == (5, 32, 48, 3) and info["fps"] == 16
    # the frames are the pipeline's (up to H.264's loss)
    ours = build_pipeline("wan_t2v", model_path=tiny_wan, overrides=SMALL)("a red fox", seed=1, output_type="np")
    assert np.abs(frames / 255.0 - ours.frames[0]).mean() < 0.05


def test_video_output_names_and_frame_requests(tiny_wan, tmp_path):
    r = run("generate", "model=wan_t2v", f"model_path={tiny_wan}", "output.filename=clip.png",
            f"hydra.run.dir={tmp_path}", *SMALL)
    assert r.returncode == 2 and "output.filename must be a file name ending in .mp4 (this model makes videos)" \
        in r.stderr
    r = run("generate", "model=wan_t2v", f"model_path={tiny_wan}", f"hydra.run.dir={tmp_path}",
            *SMALL[:-1], "+sampling.num_frames=0")
    assert r.returncode == 2 and "num_frames must be an integer >= 1 and <= 1025, got 0" in r.stderr, r.stderr
    r = run("sheet", "model=wan_t2v", f"model_path={tiny_wan}", "prompts=[a fox]", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "model 'wan_t2v' makes videos" in r.stderr

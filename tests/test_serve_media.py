"""`diffstage serve` driven by the official `openai` client, unchanged: image edits (multipart) on a tiny
Qwen-Image-Edit checkpoint, video jobs (create, poll, download, list, cancel) on a tiny Wan checkpoint, and
streamed previews (`partial_images`) on digits. One server serves the three models (serve.models)."""
import io
import time

import numpy as np
import openai
import pytest
from PIL import Image

from diffstage import build_pipeline
from serve_util import b64_pixels, client, metric, running_server

EDIT = dict(height=32, width=48, num_inference_steps=2)  # tests/test_qwen_image_edit_parity.py's sizes
VIDEO = dict(height=32, width=48, num_frames=5, num_inference_steps=3, max_sequence_length=16)  # test_wan_parity's
VIDEO_BODY = {"seed": 3, "num_frames": 5, "num_inference_steps": 3, "max_sequence_length": 16}
# H.264 is lossy: the MP4's frames are the pipeline's within this mean |Δ| (in [0, 1] units, as in
# test_wan_parity's MP4 test) and this max |Δ| (in 0-255 levels); measured 0.0087 and 36 on the tiny checkpoint.
VIDEO_MEAN_TOL, VIDEO_MAX_TOL = 0.02, 48
POLL_S = 120  # every wait on the server is bounded
# the client warns that OpenAI's own video service (Sora) will close: the API shape is what is used here
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from diffstage.models.qwen_image.tiny import build_tiny_qwen_image_edit
    from diffstage.models.wan.tiny import build_tiny_wan

    folder = tmp_path_factory.mktemp("ckpt")
    return {"qwen_image_edit": build_tiny_qwen_image_edit(folder / "tiny-qwen-image-edit"),
            "wan_t2v": build_tiny_wan(folder / "tiny-wan")}


@pytest.fixture(scope="module")
def server(checkpoints):
    models = ["digits", *({"model": name, "model_path": str(path)} for name, path in checkpoints.items())]
    with running_server([], models=models) as (url, state):
        yield url, client(url)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --- /v1/images/edits ----------------------------------------------------------------------------------------

def test_an_edit_is_the_pipelines_image_for_the_same_seed(server, checkpoints, picture):
    url, c = server
    prompt = "make the fox red"
    r = c.images.edit(model="qwen_image_edit", image=("in.png", png(picture), "image/png"), prompt=prompt,
                      size="48x32", extra_body={"seed": 3, "num_inference_steps": 2})
    got = b64_pixels(r.data[0].b64_json)
    pipe = build_pipeline("qwen_image_edit", model_path=checkpoints["qwen_image_edit"])
    expected = np.asarray(pipe(prompt, image=picture, seed=3, **EDIT).images[0].convert("RGB")).astype(np.int16)
    assert got.shape == (32, 48, 3)
    # pixel for pixel: the server runs an edit alone (never batched), through the same pipeline
    assert np.array_equal(got, expected), f"max |Δ| = {np.abs(got - expected).max()}"
    other = np.asarray(pipe(prompt, image=picture, seed=4, **EDIT).images[0].convert("RGB")).astype(np.int16)
    assert not np.array_equal(got, other)  # the seed reached the pipeline (as a form string, converted)


def test_an_edit_to_a_model_without_an_input_image_is_refused(server, picture):
    _, c = server
    with pytest.raises(openai.BadRequestError) as e:
        c.images.edit(model="digits", image=("in.png", png(picture), "image/png"), prompt="a two")
    assert e.value.status_code == 400
    assert "model 'digits' takes no input image" in e.value.message
    assert "/v1/images/edits serves: qwen_image_edit" in e.value.message


def test_an_edit_with_two_images_is_refused(server, picture):
    _, c = server
    files = [("a.png", png(picture), "image/png"), ("b.png", png(picture), "image/png")]
    with pytest.raises(openai.BadRequestError) as e:
        c.images.edit(model="qwen_image_edit", image=files, prompt="make the fox red")
    assert e.value.status_code == 400
    assert "send one image to edit (as `image`); got 2" in e.value.message


# --- /v1/videos ----------------------------------------------------------------------------------------------

def wait_for(c, video_id: str, done, what: str):
    """The job's record once `done(record)`, polled for at most POLL_S seconds."""
    deadline = time.monotonic() + POLL_S
    while True:
        video = c.videos.retrieve(video_id)
        if done(video):
            return video
        assert video.status not in ("failed", "completed"), f"{what}: the job ended {video.status}: {video.error}"
        assert time.monotonic() < deadline, f"{what}: still {video.status} ({video.progress}%) after {POLL_S} s"
        time.sleep(0.05)


def video_frames(pipe, prompt: str, seed: int) -> np.ndarray:
    """The pipeline's video [F, H, W, 3] as 0-255 levels (int16, for differences)."""
    frames = pipe(prompt, seed=seed, **VIDEO).frames[0]
    return np.stack([np.asarray(f.convert("RGB")) for f in frames]).astype(np.int16)


def encoded(frames: np.ndarray, path) -> np.ndarray:
    """`frames` after an MP4 round trip at the server's frame rate (serve.video_fps, 16 by default)."""
    from diffstage.video import read_mp4, save_mp4

    return read_mp4(save_mp4(frames.astype(np.uint8), path, {}, fps=16))[0].astype(np.int16)


def test_a_video_job_runs_and_its_mp4_is_the_pipelines_video(server, checkpoints, tmp_path):
    from diffstage.video import read_mp4

    _, c = server
    prompt = "a red fox in the snow"
    job = c.videos.create(model="wan_t2v", prompt=prompt, size="48x32", extra_body=VIDEO_BODY)
    assert job.status in ("queued", "in_progress") and job.object == "video" and job.model == "wan_t2v"
    done = wait_for(c, job.id, lambda v: v.status == "completed", "the video job")
    assert done.progress == 100 and done.error is None
    path = tmp_path / "video.mp4"
    path.write_bytes(c.videos.download_content(job.id).content)
    frames, info = read_mp4(path)
    assert frames.shape == (5, 32, 48, 3) and info["fps"] == 16
    frames = frames.astype(np.int16)
    pipe = build_pipeline("wan_t2v", model_path=checkpoints["wan_t2v"])
    ours = video_frames(pipe, prompt, 3)
    lossy = np.abs(frames - ours)
    print(f"served MP4 vs the pipeline's frames: mean |Δ| = {lossy.mean() / 255:.4f}, max |Δ| = {lossy.max()}")
    assert lossy.mean() / 255 < VIDEO_MEAN_TOL and lossy.max() <= VIDEO_MAX_TOL
    # The tiny model's videos differ little from seed to seed (as little as H.264's loss): the pipeline's frames
    # encoded the way the server encodes them (H.264 is deterministic) must decode to the served frames exactly
    same = encoded(ours, tmp_path / "ours.mp4")
    print(f"vs the pipeline's frames through the same encoder: max |Δ| = {np.abs(frames - same).max()}")
    assert np.array_equal(frames, same)
    assert not np.array_equal(frames, encoded(video_frames(pipe, prompt, 4), tmp_path / "seed4.mp4"))
    assert job.id in [v.id for v in c.videos.list()]


def test_a_cancelled_video_job_stops_and_the_next_one_runs(server):
    url, c = server
    cancelled = dict(model="wan_t2v", endpoint="videos", outcome="cancelled")
    before = metric(url, "diffstage_requests_total", **cancelled)
    long = c.videos.create(model="wan_t2v", prompt="a long video", size="48x32",
                           extra_body={**VIDEO_BODY, "num_inference_steps": 400})
    running = wait_for(c, long.id, lambda v: v.status == "in_progress" and v.progress > 0, "the long job")
    assert running.progress < 100
    deleted = c.videos.delete(long.id)
    assert deleted.id == long.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        c.videos.retrieve(long.id)
    # the job stops at its next denoising step: the metric says so (a job run to its end counts as "ok")
    deadline = time.monotonic() + POLL_S
    while metric(url, "diffstage_requests_total", **cancelled) < before + 1:
        assert time.monotonic() < deadline, "the cancelled video job did not stop"
        time.sleep(0.05)
    assert metric(url, "diffstage_requests_total", **cancelled) == before + 1
    short = c.videos.create(model="wan_t2v", prompt="a short video", size="48x32", extra_body=VIDEO_BODY)
    assert wait_for(c, short.id, lambda v: v.status == "completed", "the job after the cancel").progress == 100


def test_a_video_request_to_an_image_model_is_refused(server):
    _, c = server
    with pytest.raises(openai.BadRequestError) as e:
        c.videos.create(model="digits", prompt="a two")
    assert e.value.status_code == 400
    assert "model 'digits' makes images, not videos; /v1/videos serves: wan_t2v" in e.value.message


def test_an_image_request_to_a_video_model_is_refused(server):
    _, c = server
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(model="wan_t2v", prompt="a cat")
    assert e.value.body["message"] == ("model 'wan_t2v' makes videos: create a job with POST /v1/videos (the Images "
                                       "API serves: digits, qwen_image_edit)")


# --- stream=true ---------------------------------------------------------------------------------------------

def test_a_stream_sends_the_partial_images_then_the_same_final_image(server):
    _, c = server
    prompt = "a handwritten digit two"
    events = list(c.images.generate(model="digits", prompt=prompt, stream=True, partial_images=2,
                                    extra_body={"seed": 3}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = b64_pixels(events[-1].b64_json)
    alone = c.images.generate(model="digits", prompt=prompt, extra_body={"seed": 3})
    assert np.array_equal(final, b64_pixels(alone.data[0].b64_json))  # pixel for pixel
    partials = [b64_pixels(e.b64_json) for e in events[:2]]
    assert all(p.shape == final.shape for p in partials)
    # previews of earlier latents: each differs from the final image, and from the other
    assert all(not np.array_equal(p, final) for p in partials) and not np.array_equal(*partials)

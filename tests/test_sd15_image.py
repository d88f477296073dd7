"""Stable Diffusion 1.5 image-to-image and inpainting: diffstage vs diffusers.StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on tiny random checkpoints, at full strength and below it; and the general
stage options they use (strength_field, sampled VAE latents, ImageNoisingStage, MaskPreparationStage)."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, assert_matches_diffusers, line_of, problems_of
from diffstage import RequestError, StageError, build_pipeline

TOL = 1e-4
PROMPT = "a red fox in the snow"
CASES = {
    "cfg": dict(prompt=PROMPT, guidance_scale=7.5),
    "cfg_negative": dict(prompt=PROMPT, negative_prompt="blurry", guidance_scale=7.5),
    "no_cfg": dict(prompt=PROMPT, guidance_scale=1.0),
    "batch": dict(prompt=["a red fox", "a blue cat"], negative_prompt=["blurry", "dark"], guidance_scale=7.5),
}
STRENGTHS = (1.0, 0.5)  # 4 steps at 0.5: the last 2 run, from the image's latents noised to the first of them
# Every case with SD 1.5's own scheduler (PNDM); CFG with Euler (init_noise_sigma is not 1: pure noise is scaled
# by it, a noised image is not; its begin index follows the strength) and DDIM (eta and the generator).
RUNS = [(kind, "pndm", strength, case) for kind in ("img2img", "inpaint") for strength in STRENGTHS
        for case in sorted(CASES)] + \
       [(kind, scheduler, strength, "cfg") for kind in ("img2img", "inpaint") for scheduler in ("euler", "ddim")
        for strength in STRENGTHS]
# The t2i checkpoint serves image-to-image (the SD 1.5 checkpoint itself; Diffusers' Img2Img pipeline loads it)
VARIANTS = {"img2img": ("t2i", "sd15_img2img"), "inpaint": ("inpaint", "sd15_inpaint")}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(kind, scheduler) -> (the Diffusers pipeline, ours), each on its own tiny checkpoint."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    from diffstage.models.sd15.tiny import build_tiny_sd15

    made = {}
    reference = {"img2img": StableDiffusionImg2ImgPipeline, "inpaint": StableDiffusionInpaintPipeline}

    def get(kind, scheduler="pndm"):
        if (kind, scheduler) not in made:
            variant, model = VARIANTS[kind]
            path = build_tiny_sd15(tmp_path_factory.mktemp("ckpt") / f"tiny-sd15-{variant}-{scheduler}",
                                   variant=variant, scheduler=scheduler)
            ref = reference[kind].from_pretrained(path, torch_dtype=torch.float32)
            ref.set_progress_bar_config(disable=True)
            made[kind, scheduler] = ref, build_pipeline(model, model_path=path)
        return made[kind, scheduler]

    return get


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask():
    """White (repaint) in the middle, black (keep) around it."""
    image = Image.new("L", (48, 32), 0)
    image.paste(255, (8, 8, 40, 24))
    return image


def inputs(kind, picture, mask) -> dict:
    # Diffusers' image-to-image takes its size from the image; inpainting from height/width
    return dict(image=picture) if kind == "img2img" else dict(image=picture, mask_image=mask, height=32, width=48)


@pytest.mark.parametrize("kind,scheduler,strength,case", RUNS)
def test_parity_with_diffusers(pipes, picture, mask, kind, scheduler, strength, case):
    ref, pipe = pipes(kind, scheduler)
    assert type(ref.scheduler).__name__.lower().startswith(scheduler)
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    common = dict(num_inference_steps=4, strength=strength, output_type="np", **inputs(kind, picture, mask), **kw)
    expected = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), **common).images
    ours = pipe(prompt, seed=3, **common)
    assert_matches_diffusers(ours.images, expected, f"sd15_{kind}/{scheduler}/strength {strength}/{case}", TOL)
    assert torch.equal(ours.req.timesteps, ref.get_timesteps(4, strength, "cpu")[0])  # the strength's share


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_parity_would_catch_a_lost_input(pipes, picture, mask, kind):
    """The image, the strength (and the mask) each move the output far more than TOL, so the parity cases
    would notice a pipeline that ignored one."""
    _, pipe = pipes(kind)
    kw = dict(num_inference_steps=4, strength=0.5, output_type="np", seed=3, **inputs(kind, picture, mask))
    base = pipe(PROMPT, **kw).images
    changes = {"image": dict(image=picture.transpose(Image.FLIP_LEFT_RIGHT)), "strength": dict(strength=1.0)}
    if kind == "inpaint":
        changes["mask"] = dict(mask_image=mask.transpose(Image.FLIP_TOP_BOTTOM).point(lambda v: 255 - v))
    for what, change in changes.items():
        moved = float(np.abs(base - pipe(PROMPT, **{**kw, **change}).images).max())
        assert moved > 100 * TOL, what


def test_sampled_image_latents_are_drawn_on_every_call(pipes, picture, mask):
    """The stages that sample the VAE's latents from the generator are never reused from an earlier call (which
    would leave the generator undrawn and the noise different): the same request twice gives the same image."""
    _, pipe = pipes("inpaint")
    kw = dict(num_inference_steps=4, strength=0.5, output_type="np", seed=5, **inputs("inpaint", picture, mask))
    assert np.array_equal(pipe(PROMPT, **kw).images, pipe(PROMPT, **kw).images)
    assert [s.reusable for s in pipe.stages if type(s).__name__ == "ImageEncodingStage"] == [False]


def test_output_size_follows_the_image(pipes):
    """Without height/width, image-to-image keeps the image's size, rounded down to multiples of 8."""
    _, pipe = pipes("img2img")
    picture = Image.new("RGB", (44, 30), (200, 30, 30))
    out = pipe(PROMPT, image=picture, num_inference_steps=2, output_type="np", seed=0)
    assert (out.req.height, out.req.width) == (24, 40)
    assert out.images.shape == (1, 24, 40, 3)


def test_strength_errors_name_the_field(pipes, picture, mask):
    _, pipe = pipes("img2img")
    with pytest.raises(RequestError, match=r"strength must be a number >= 0 and <= 1, got 1\.5"):
        pipe(PROMPT, image=picture, strength=1.5, num_inference_steps=4)
    with pytest.raises(RequestError, match=r"strength=0\.1 with num_inference_steps=4 leaves no step to run "
                                           r"\(int\(steps \* strength\) = 0\): raise either of them"):
        pipe(PROMPT, image=picture, strength=0.1, num_inference_steps=4)
    _, inpaint = pipes("inpaint")
    with pytest.raises(RequestError, match=r"mask_image is required: the mask \(white: repaint, black: keep\)"):
        inpaint(PROMPT, image=picture, height=32, width=48, num_inference_steps=2)


def test_strength_field_checks_its_range_itself():
    """A model YAML that declares `strength` without bounds still gets a range check from the stage."""
    from diffstage.req import FieldSpec, Req
    from diffstage.stages import TimestepPreparationStage

    stage = TimestepPreparationStage(scheduler=None, strength_field="strength")
    req = Req.with_fields([FieldSpec("strength", "request", type="float")])(num_inference_steps=4)
    for value, message in ((2.0, "strength must be a number in [0, 1], got 2.0"),
                           (float("nan"), "strength must be a number in [0, 1], got nan"),
                           (0.5, None)):
        req.strength = value
        assert stage.request_problems(req) == ([message] if message else [])


def test_seed_lists_are_refused_where_the_vae_samples(pipes, picture):
    _, pipe = pipes("img2img")
    with pytest.raises(RequestError, match=r"seed is a list, but ImageEncodingStage samples the image's latents "
                                           r"from the generator \(sample: true\): give one seed"):
        pipe(["a red fox", "a blue cat"], image=picture, seed=[1, 2], num_inference_steps=2)


def test_a_misspelt_strength_field_is_reported_with_its_line(tmp_path):
    text = (REPO / "pipelines_yaml" / "sd15_img2img.yaml").read_text()
    path = tmp_path / "img2img.yaml"
    path.write_text(text.replace("strength_field: strength ", "strength_field: strenght "))
    line = line_of(path, "diffstage.stages.TimestepPreparationStage")
    assert [str(p) for p in problems_of(path)] == [
        f"{path}:{line}: stages[4]: [TimestepPreparationStage] reads 'strenght', which is not a Req field "
        "(did you mean 'strength'?)"]


def test_image_noising_needs_matching_shapes():
    from diffusers import DDIMScheduler

    from diffstage.req import FieldSpec, Req
    from diffstage.stages import ImageNoisingStage

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    stage = ImageNoisingStage(scheduler)
    stage.bind({}, {})
    cls = Req.with_fields([FieldSpec("image_latents", "state")])
    req = cls(latents=torch.zeros(1, 4, 4, 4), image_latents=torch.zeros(2, 4, 4, 4), timesteps=scheduler.timesteps)
    with pytest.raises(StageError, match=r"ImageNoisingStage: the image latents \('image_latents'\) have shape "
                                         r"\[2, 4, 4, 4\], the noise \[1, 4, 4, 4\]; they must match"):
        stage(req)
    req.image_latents = None  # skipped at full strength: the noise stays, for init_noise_sigma
    assert stage(req).latents_noised is False


def test_cli_inpaints_image_files(pipes, picture, mask, tmp_path):
    """`image=PATH sampling.mask_image=PATH` on the command line (image fields take file paths)."""
    from test_cli import run

    ref, _ = pipes("inpaint")
    picture.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    checkpoint = ref.config._name_or_path
    r = run("generate", "model=sd15_inpaint", f"model_path={checkpoint}", f"image={tmp_path / 'in.png'}",
            f"sampling.mask_image={tmp_path / 'mask.png'}", "prompt=a red fox", "sampling.height=32",
            "sampling.width=48", "sampling.num_inference_steps=2", "sampling.strength=0.5",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "run" / "image.png").size == (48, 32)


def test_img2img_without_an_image_says_so(pipes):
    _, pipe = pipes("img2img")
    with pytest.raises(RequestError) as e:  # sizes unset: they would follow the image, which is missing
        pipe(PROMPT, num_inference_steps=2)
    assert "image is not set: image-to-image needs an input image (its size is the output's unless height and " \
           "width are given)" in str(e.value)


def test_sigmas_follow_the_truncated_schedule():
    from diffusers import EulerDiscreteScheduler

    from diffstage.req import FieldSpec, Req
    from diffstage.stages import TimestepPreparationStage

    stage = TimestepPreparationStage(EulerDiscreteScheduler(), strength_field="strength")
    stage.bind({}, {})
    cls = Req.with_fields([FieldSpec("strength", "request", default=1.0)])
    req = stage(cls(num_inference_steps=4, strength=0.5, latents=torch.zeros(1, 4, 4, 4)))
    full = stage.scheduler.sigmas
    assert len(req.timesteps) == 2 and torch.equal(req.sigmas, full[2:])  # sigmas[i] is step i's
    assert torch.equal(req.timesteps, stage.scheduler.timesteps[2:])

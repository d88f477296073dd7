"""A seed per prompt (what the server batches with): each prompt of a batch gets exactly the noise, and so the
image, it gets alone; refused with a clear error where a stage cannot give it that."""
from __future__ import annotations

import numpy as np
import pytest

from diffstage import build_pipeline
from diffstage.errors import RequestError
from diffstage.session import Session

PROMPTS = ["a handwritten digit three", "a handwritten digit eight"]


@pytest.fixture(scope="module")
def digits():
    return build_pipeline("digits", overrides=["sampling.num_inference_steps=4"], session=Session())


def test_each_prompt_of_a_batch_gets_its_own_seeds_images(digits):
    batch = digits(PROMPTS, seed=[5, 9], num_images_per_prompt=2, output_type="np").images
    alone = [digits(p, seed=s, num_images_per_prompt=2, output_type="np").images for p, s in zip(PROMPTS, (5, 9))]
    expected = np.concatenate(alone)
    # the same noise; only the batch shape of the matrix products differs, so float rounding may
    assert batch.shape == expected.shape and float(np.abs(batch - expected).max()) < 1e-5
    assert float(np.abs(batch[0] - batch[2]).max()) > 0.05  # and the seeds do differ


def test_a_seed_list_must_have_one_seed_per_prompt(digits):
    with pytest.raises(RequestError, match=r"seed is a list of 3 seeds; a list needs one seed per prompt \(2\)"):
        digits(PROMPTS, seed=[1, 2, 3])
    with pytest.raises(RequestError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\] or a list of them "
                                           r"\(one per prompt\), got \[1, 'x'\]"):
        digits(PROMPTS, seed=[1, "x"])


def test_a_scheduler_that_draws_noise_every_step_refuses_seed_lists():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build_pipeline("digits", overrides=["sampling.num_inference_steps=2"], session=Session())
    assert pipe.takes_seed_lists()
    stochastic = FlowMatchEulerDiscreteScheduler.from_config({**pipe.modules["scheduler"].config,
                                                              "stochastic_sampling": True})
    for stage in pipe.stages:
        if hasattr(stage, "scheduler"):
            stage.scheduler = stochastic
    assert not pipe.takes_seed_lists()
    with pytest.raises(RequestError, match="seed is a list, but FlowMatchEulerDiscreteScheduler draws noise at every "
                                           "step from one generator, so the prompts of a batch cannot each have "
                                           "their own seed: give one seed"):
        pipe(PROMPTS, seed=[1, 2])
    assert len(pipe(PROMPTS[0], seed=1).images) == 1  # one seed is fine


def test_which_schedulers_draw_noise():
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

    from diffstage.sampling import step_draws_noise

    assert not step_draws_noise(FlowMatchEulerDiscreteScheduler(), {})
    assert step_draws_noise(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), {})
    assert not step_draws_noise(EulerDiscreteScheduler(), {})
    assert step_draws_noise(EulerAncestralDiscreteScheduler(), {})
    assert step_draws_noise(DDPMScheduler(), {})
    assert not step_draws_noise(DDIMScheduler(), {}) and step_draws_noise(DDIMScheduler(), {"eta": 0.5})
    assert not step_draws_noise(DPMSolverMultistepScheduler(), {})
    assert step_draws_noise(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {})
    assert not step_draws_noise(UniPCMultistepScheduler(), {})

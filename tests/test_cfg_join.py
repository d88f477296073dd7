"""Batched CFG with nested model inputs (a UNet's added_cond_kwargs: a dict of tensors), and the documented
fallback to two calls for inputs that cannot be joined."""
import torch

from diffstage.req import Req
from diffstage.stages import DenoisingStage
from diffstage.stages.cfg_join import UNJOINABLE, join_branches


class SubtractScheduler:
    def step(self, model_output, t, sample, return_dict=False):
        return (sample - model_output,)


class AddedCondTransformer(torch.nn.Module):
    """A UNet-like signature: predicts from a dict of per-sample tensors; records each call's batch."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, flags=None, return_dict=False):
        self.batches.append(sample.shape[0])
        text, time = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        pred = sample * encoder_hidden_states[:, None] + text.sum(-1, keepdim=True) + time.mean(-1, keepdim=True)
        return (pred + timestep[:, None] / 1000,)


class Opaque:
    """An input `==` cannot decide (compares like a tensor would): the stage must not batch it."""

    def __eq__(self, other):
        raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous")


def run(cfg_batch: bool, extra=None):
    def model_inputs(req, settings, transformer, negative):
        p = "negative_" if negative else ""
        inputs = {"encoder_hidden_states": getattr(req, p + "prompt_embeds"),
                  "added_cond_kwargs": {"text_embeds": getattr(req, p + "pooled_prompt_embeds"),
                                        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}}
        if extra is not None:
            inputs["flags"] = extra(negative)
        return inputs

    stage = DenoisingStage(AddedCondTransformer(), SubtractScheduler(), latents_arg="sample", cfg_batch=cfg_batch,
                           progress=False)
    stage.bind({"model_inputs": model_inputs}, {})
    req = Req(latents=torch.ones(2, 3), timesteps=torch.tensor([1000.0, 500.0]), do_cfg=True, cfg_scale=3.0,
              prompt_embeds=torch.tensor([2.0, 0.5]), negative_prompt_embeds=torch.tensor([1.0, 1.0]),
              pooled_prompt_embeds=torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
              negative_pooled_prompt_embeds=torch.zeros(2, 2))
    return stage(req).latents, stage.transformer.batches


def test_dict_of_tensors_batches_and_matches_two_calls():
    batched, batches = run(cfg_batch=True)
    separate, two_calls = run(cfg_batch=False)
    assert batches == [4, 4] and two_calls == [2] * 4
    assert torch.allclose(batched, separate, atol=1e-6) and not torch.equal(batched, torch.ones(2, 3))


def test_unjoinable_input_falls_back_to_two_calls():
    fallback, batches = run(cfg_batch=True, extra=lambda negative: Opaque())
    separate, _ = run(cfg_batch=False)
    assert batches == [2] * 4  # two calls a step, as documented, instead of a crash
    assert torch.allclose(fallback, separate, atol=1e-6)


def test_join_rules():
    t = torch.ones(2, 1)
    assert join_branches({"a": [t, (t, "x")]}, {"a": [t * 2, (t * 3, "x")]}, 2)["a"][1][0].shape == (4, 1)
    assert join_branches({"a": t}, {"b": t}, 2) is UNJOINABLE  # other keys
    assert join_branches([t], [t, t], 2) is UNJOINABLE  # other lengths
    assert join_branches({"a": 1}, {"a": 1.0}, 2) is UNJOINABLE  # equal, but of other types
    assert join_branches({"a": torch.ones(3, 1)}, {"a": torch.ones(3, 1)}, 2) is UNJOINABLE  # not batch-first
    assert join_branches((t,), [t], 2) is UNJOINABLE
    assert join_branches({"n": None, "s": "v"}, {"n": None, "s": "v"}, 2) == {"n": None, "s": "v"}

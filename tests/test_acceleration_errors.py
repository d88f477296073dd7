"""Error texts of the acceleration declaration's shape and of attention diffstage cannot split."""
import re

import pytest
import torch
from pydantic import ValidationError

from diffstage import DiffstageError
from diffstage.acceleration_spec import SequenceSpec
from diffstage.attention.route import AttentionSlot, Route, _Catch
from diffstage.distributed import ParallelState


def test_a_split_plan_must_split_something():
    with pytest.raises(ValidationError, match=re.escape(
            "declare what splits: `inputs` (module path -> {argument: dim}) or `outputs`")):
        SequenceSpec(gather={"proj_out": 1})


def test_a_module_path_must_be_names_and_indices():
    with pytest.raises(ValidationError, match=re.escape(
            "'blocks[0]' is not a module path (names and indices joined by '.', '*' for every item of a list, '' "
            "for the module itself)")):
        SequenceSpec(inputs={"blocks[0]": {"hidden_states": 1}}, gather={"proj_out": 1})


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(dropout_p=0.1), dict(scale=0.25)])  # usual: 0.5
def test_attention_diffstage_cannot_split_is_refused_under_sequence_parallelism(kwargs):
    q = torch.zeros(1, 2, 3, 4)  # sdpa's [B, H, L, D]
    state = ParallelState(ulysses=2, rank=0, world_size=2)
    catch = _Catch(AttentionSlot("blocks.0.attn1", local=False), Route("sdpa", state))
    with pytest.raises(DiffstageError, match=re.escape(
            "sequence parallelism: attention module 'blocks.0.attn1' calls scaled_dot_product_attention with a "
            "causal mask, dropout, grouped heads or a custom scale, which diffstage's parallel attention does not "
            "split")):
        catch.attend(q, q, q, **kwargs)
    local = _Catch(AttentionSlot("blocks.0.attn2", local=True), Route("sdpa", state))  # no split: torch's own
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, **{**kwargs, "dropout_p": 0.0})
    assert torch.allclose(local.attend(q, q, q, **{**kwargs, "dropout_p": 0.0}), expected)

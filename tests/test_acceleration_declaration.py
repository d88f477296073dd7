"""The acceleration declaration of a model added by config alone (a YAML outside the package): sequence
parallelism and a step cache through the declaration, and a wrong declaration stopped at its file:line
before any weight loads."""
import json
import re
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml

from conftest import REPO
from test_cli import run
from test_parallel import launch
from diffstage import DiffstageError, build_pipeline

TOL = 1e-4
REQUEST = dict(prompt=["a red fox", "a blue cat in the big city at night"], negative_prompt="blurry",
               guidance_scale=4.0, seed=3, num_inference_steps=4, height=48, width=48)  # 9 image tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from diffstage.models.pixart.tiny import build_tiny_pixart

    return build_tiny_pixart(tmp_path_factory.mktemp("ckpt") / "tiny-pixart")


def family_yaml(folder: Path, acceleration: dict) -> Path:
    """A new family's YAML, outside pipelines_yaml/: PixArt's modules and stages under another name, with the
    given acceleration declaration and no step cache defaults (the declaration alone must do)."""
    data = yaml.safe_load((REPO / "pipelines_yaml" / "pixart_sigma.yaml").read_text())
    data.update(name="my_dit", description="a family added by config", acceleration={"transformer": acceleration})
    data.pop("step_cache", None)
    path = folder / "my_dit.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


DECLARED = {"blocks": ["transformer_blocks"], "residual": {"input": "hidden_states", "returns": "hidden_states"},
            "sequence": {"outputs": {"pos_embed": {0: 1}}, "gather": {"proj_out": 1}}}


def test_a_family_added_by_config_runs_ulysses_and_first_block(checkpoint, tmp_path):
    path = family_yaml(tmp_path, DECLARED)
    cache = ["cache=first_block", "cache.threshold=0.2"]
    launch(checkpoint, tmp_path, [{"name": "ulysses-cached", "model": str(path), "parallel": {"ulysses": 2},
                                   "overrides": cache, "request": REQUEST}])
    one = build_pipeline(str(path), model_path=checkpoint, overrides=cache + ["reuse.enabled=false"])
    out = one(**REQUEST, output_type="np")
    ours = np.load(tmp_path / "ulysses-cached.npy")
    diff = float(np.abs(ours - out.images).max())
    print(f"config-only family, ulysses=2 + cache=first_block: max|Δ| = {diff:.3g}")
    assert diff <= TOL
    ranks = [json.loads((tmp_path / f"ulysses-cached-rank{r}-reports.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == out.reports, (ranks, out.reports)  # every rank decided as one process did
    (stats,) = [report["step_cache"] for report in out.reports.values()]
    assert stats["cached"] >= 1 and stats["computed"] >= 1, stats  # the cache did skip steps, through the blocks
    assert json.loads((tmp_path / "ulysses-cached.json").read_text())["bytes_sent"] > 0


def corrupt_weights(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint whose transformer weights cannot load: an error seen first proves the check
    ran before any weight loaded."""
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(checkpoint, copy)
    for weights in (copy / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    return copy


@pytest.mark.parametrize("acceleration, key, message", [
    ({"blocks": ["layers"]}, "acceleration.transformer.blocks",
     "PixArtTransformer2DModel has no module list 'layers' (it has: transformer_blocks)"),
    ({"sequence": {"inputs": {"": {"tokens": 1}}, "gather": {"proj_out": 1}}},
     "acceleration.transformer.sequence.inputs..tokens",
     "PixArtTransformer2DModel.forward takes no argument 'tokens' (it takes hidden_states, "
     "encoder_hidden_states, timestep, added_cond_kwargs, cross_attention_kwargs, attention_mask, "
     "encoder_attention_mask, return_dict)"),
    ({"sequence": {"outputs": {"pos_embeds": {0: 1}}, "gather": {"proj_out": 1}}},
     "acceleration.transformer.sequence.outputs.pos_embeds",
     "PixArtTransformer2DModel has no module 'pos_embeds' (did you mean 'pos_embed'?)"),
])
def test_a_wrong_declaration_exits_2_at_its_line_before_weights_load(checkpoint, tmp_path, acceleration, key,
                                                                     message):
    path = family_yaml(tmp_path, acceleration)
    r = run("generate", f"model={path}", f"model_path={corrupt_weights(checkpoint, tmp_path)}", "prompt=a fox",
            "sampling.num_inference_steps=1", "sampling.height=32", "sampling.width=32")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("acceleration:"))
    assert re.search(rf"{re.escape(str(path))}:\d+: {re.escape(key)}: {re.escape(message)}", r.stderr), r.stderr
    assert int(re.search(rf"{re.escape(str(path))}:(\d+):", r.stderr).group(1)) > line


def test_heads_not_divisible_by_the_ulysses_degree_stop_before_weights_load(checkpoint, tmp_path):
    from diffstage.acceleration_check import check_before_load
    from diffstage.distributed import ParallelState
    from diffstage.model_check import check_model

    path = family_yaml(tmp_path, DECLARED)
    checked = check_model(path)
    broken = corrupt_weights(checkpoint, tmp_path)
    with pytest.raises(DiffstageError, match=re.escape(
            f"{path}:") + r"\d+" + re.escape(
            ": acceleration.transformer: parallel.ulysses=3 splits the attention heads, but module 'transformer' "
            f"has 4 (num_attention_heads in {broken / 'transformer' / 'config.json'}); use a Ulysses degree "
            "that divides 4 (or parallel.ring)")):
        check_before_load(checked, broken, checked.allowlist,
                          ParallelState(ulysses=3, world_size=3))


def test_a_split_plan_without_gather_is_refused_with_its_line(tmp_path):
    from diffstage.model_check import check_model

    path = family_yaml(tmp_path, {"sequence": {"outputs": {"pos_embed": {0: 1}}}})
    with pytest.raises(DiffstageError) as e:
        check_model(path)
    assert re.search(rf"{re.escape(str(path))}:\d+: acceleration\.transformer\.sequence\.gather: "
                     r"missing required key 'gather'", str(e.value)), str(e.value)


def test_a_cp_plan_entry_diffstage_cannot_read_is_named():
    from diffstage.distributed.split_plan import from_cp_plan

    class Odd(torch.nn.Module):
        _cp_plan = {"blocks.0": [object()]}

    with pytest.raises(DiffstageError, match=re.escape(
            "Odd._cp_plan['blocks.0'] holds list, which diffstage does not read; declare "
            "acceleration.<module>.sequence in the model YAML instead")):
        from_cp_plan(Odd())


def test_a_split_plan_without_attention_modules_is_refused_for_sequence_parallelism(monkeypatch):
    from diffstage.distributed import ParallelState, state
    from diffstage.distributed.split_plan import PLAN
    from diffstage.stages import DenoisingStage

    monkeypatch.setattr(state, "_STATE", ParallelState(ring=2, rank=0, world_size=2))
    model = torch.nn.Linear(2, 2)
    setattr(model, PLAN, object())  # a split plan, and no attention module routed
    with pytest.raises(ValueError, match=re.escape(
            "parallel.ulysses / parallel.ring: Linear has a split plan but no attention module with a Diffusers "
            "attention processor, so its attention would see only each rank's tokens; use parallel.cfg")):
        DenoisingStage(model, None)

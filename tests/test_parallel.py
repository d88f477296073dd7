"""Ulysses, Ring and CFG parallelism on 2 (and 4) gloo processes give the image one process gives."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from test_cli import run
from diffstage import DiffstageError, build_pipeline

TOL = 1e-4
TORCHRUN = Path(sys.executable).with_name("torchrun")
REQUEST = dict(prompt="a red fox", negative_prompt="blurry", true_cfg_scale=4.0, seed=3, num_inference_steps=2)
SIZES = {"even": dict(height=32, width=32, max_sequence_length=16),  # 4 image tokens, 16 text tokens
         "odd": dict(height=48, width=48, max_sequence_length=15)}  # 9 and 15: not divisible by 2


def launch(checkpoint, out_dir, cases, processes=2, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFSTAGE_DIST_TIMEOUT": "120"}
    r = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}",
                        str(REPO / "tests" / "parallel_worker.py"), str(checkpoint), str(out_dir), json.dumps(cases)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def reference(checkpoint, size):
    pipe = build_pipeline("flux", model_path=checkpoint, overrides=["reuse.enabled=false"])
    return pipe(**REQUEST, **SIZES[size], output_type="np").images


def test_two_processes_match_one(tiny_flux_dev, tmp_path):
    cases = [{"name": f"{mode}-{size}", "parallel": {mode: 2}, "request": {**REQUEST, **SIZES[size]}}
             for mode in ("ulysses", "ring", "cfg") for size in SIZES]
    launch(tiny_flux_dev, tmp_path, cases)
    for size in SIZES:
        expected = reference(tiny_flux_dev, size)
        for mode in ("ulysses", "ring", "cfg"):
            ours = np.load(tmp_path / f"{mode}-{size}.npy")
            diff = float(np.abs(ours - expected).max())
            print(f"{mode}=2 {size}: max|Δ| = {diff:.3g}")
            assert ours.shape == expected.shape and diff <= TOL, (mode, size, diff)
            assert json.loads((tmp_path / f"{mode}-{size}.json").read_text())["bytes_sent"] > 0  # it communicated


def test_four_processes_ulysses_times_ring(tiny_flux_dev, tmp_path):
    launch(tiny_flux_dev, tmp_path, [{"name": "usp", "parallel": {"ulysses": 2, "ring": 2},
                                      "request": {**REQUEST, **SIZES["odd"]}}], processes=4)
    diff = float(np.abs(np.load(tmp_path / "usp.npy") - reference(tiny_flux_dev, "odd")).max())
    print(f"ulysses=2 x ring=2: max|Δ| = {diff:.3g}")
    assert diff <= TOL


def test_step_caches_take_one_decision_on_every_rank(tiny_flux_dev, tmp_path):
    """With cache=..., the change is summed over the ranks: both ranks skip the same steps, and the image is
    the one process's cached image (CFG parallel: that of the batched branches, measured over both)."""
    caches = {"teacache": ["cache=teacache", "cache.threshold=0.2"],
              "first_block": ["cache=first_block", "cache.threshold=0.3"]}
    request = {**REQUEST, **SIZES["odd"], "num_inference_steps": 8}
    cases = [{"name": f"{mode}-{kind}", "parallel": {mode: 2}, "overrides": overrides, "request": request}
             for mode in ("ulysses", "cfg") for kind, overrides in caches.items()]
    launch(tiny_flux_dev, tmp_path, cases)
    for kind, overrides in caches.items():
        one = build_pipeline("flux", model_path=tiny_flux_dev, overrides=["reuse.enabled=false", *overrides])
        out = one(**request, output_type="np")
        for mode in ("ulysses", "cfg"):
            reports = [json.loads((tmp_path / f"{mode}-{kind}-rank{r}-reports.json").read_text()) for r in (0, 1)]
            diff = float(np.abs(np.load(tmp_path / f"{mode}-{kind}.npy") - out.images).max())
            print(f"{mode}=2 cache={kind}: {reports[0]}, max|Δ| vs one process = {diff:.3g}")
            assert reports[0] == reports[1] == out.reports
            assert out.reports["4:DenoisingStage"]["step_cache"]["cached"] > 0 and diff <= TOL


def test_torchrun_cfg_parallel_writes_one_png_equal_to_one_process(tmp_path):
    """The README's command, on the default digits model."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFSTAGE_DIST_TIMEOUT": "120"}
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "diffstage", "generate",
                        "prompt=a handwritten digit three", "parallel.cfg=2", f"hydra.run.dir={tmp_path / 'two'}"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line for line in r.stdout.splitlines() if line.endswith(".png")] == [str(tmp_path / "two" / "image.png")]
    one = run("generate", "prompt=a handwritten digit three", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / d / "image.png")).astype(int) for d in ("two", "one"))
    # Not bit for bit: one process batches both CFG branches in one call, two ranks run one each, and matmuls of
    # other shapes round differently (on a 2-core AMD EPYC one of 3,072 values moved by 1/255). What holds is
    # float rounding (the arrays above agree within TOL), so a pixel within one 8-bit step (1/255).
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".hydra", "diffstage.log", "image.png"]


@pytest.mark.parametrize("args, message", [
    (["parallel.cfg=2"], "parallel.cfg=2 runs on 2 processes: launch it with torchrun, e.g. torchrun "
                         "--nproc-per-node=2 -m diffstage generate ... parallel.cfg=2"),
    (["parallel.ring=0"], "parallel.ring must be a positive integer, got 0"),
    (["+parallel.tensor=2"], "unknown key 'parallel.tensor'"),
])
def test_misconfigurations_without_torchrun(args, message):
    r = run("generate", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


@pytest.mark.parametrize("args, message", [
    (["parallel.ulysses=2", "parallel.ring=2"], "the parallel degrees multiply to 4 (cfg 1 x ulysses 2 x ring 2), "
                                               "but torchrun started 2 processes"),
    (["model=pixart_sigma", "parallel.ulysses=2"],
     "model 'pixart_sigma' needs model_path"),
])
def test_misconfigurations_under_torchrun_fail_on_every_rank_without_hanging(args, message, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFSTAGE_DIST_TIMEOUT": "60"}
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "diffstage", "generate", *args,
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert r.returncode != 0
    # Each rank says why, but torchrun stops the others as soon as one exits, so one message may be all there is.
    assert message in r.stderr, r.stderr[-3000:]
    ranks_output = r.stderr.split("torch/distributed/elastic")[0]  # torchrun's own report (and traceback) follows
    assert "Traceback" not in ranks_output, r.stderr[-3000:]


def test_ulysses_degree_must_divide_the_heads(tiny_flux_dev, monkeypatch):
    from diffstage.distributed import state

    monkeypatch.setattr(state, "_STATE", state.ParallelState(ulysses=3, rank=0, world_size=3))
    monkeypatch.setattr(state, "init_parallel", lambda options, device: state._STATE)
    from diffstage import build_plan

    monkeypatch.setattr(build_plan, "init_parallel", lambda options, device: state._STATE)
    with pytest.raises(DiffstageError, match="parallel.ulysses=3 splits the attention heads, but FluxTransformer "
                                             "has 2; use a Ulysses degree that divides 2"):
        build_pipeline("flux", model_path=tiny_flux_dev)


@pytest.mark.parametrize("options, world, message", [
    ({"ulysses": 2}, 4, "the parallel degrees multiply to 2 (cfg 1 x ulysses 2 x ring 1), but torchrun started 4 "
                        "processes; make them match (--nproc-per-node=2, or degrees whose product is 4)"),
    ({"cfg": 3}, 3, "parallel.cfg is 3: CFG has two branches, so it is 1 or 2"),
    ({"ring": True}, 1, "parallel.ring must be a positive integer, got True"),
])
def test_layout_errors(options, world, message, monkeypatch):
    from diffstage.distributed import check_layout

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(DiffstageError, match=re.escape(message)):
        check_layout(options)


def test_sequence_parallel_refusals():
    import torch

    from diffstage.attention import attention
    from diffstage.distributed import ParallelState, sequence_parallel, shard_inputs

    state = ParallelState(ulysses=2, rank=0, world_size=2, ranks={"sequence": [0, 1]})
    with pytest.raises(DiffstageError, match="sequence parallelism over 2 processes needs at least 2 tokens in "
                                             "'hidden_states', which has 1; use fewer processes or a larger image"):
        shard_inputs({"hidden_states": torch.zeros(1, 1, 4)}, {"hidden_states": 1}, state)
    q = torch.zeros(1, 2, 2, 4)
    with sequence_parallel(state), pytest.raises(DiffstageError, match=re.escape(
            "sequence parallelism splits attention masks over the keys only, but this model's attention takes a "
            "mask of shape (1, 1, 2, 2), which varies over heads or queries; run this model with parallel.cfg only")):
        attention(q, q, q, mask=torch.ones(1, 1, 2, 2, dtype=torch.bool).tril())  # causal: varies over queries


def test_sequence_parallel_needs_a_plan(monkeypatch):
    import torch

    from diffstage.distributed import ParallelState, state
    from diffstage.stages import DenoisingStage

    monkeypatch.setattr(state, "_STATE", ParallelState(ring=2, rank=0, world_size=2))
    with pytest.raises(ValueError, match=re.escape(
            "parallel.ulysses / parallel.ring split the transformer's sequence, but Linear declares no "
            "sequence_parallel_plan (diffstage's native transformers do), and its model YAML no split plan: declare "
            "`acceleration.<module>.sequence`, or `acceleration: {<module>: {}}` for the class's Diffusers _cp_plan "
            "where it has one (see the README's \"Adding a model\"); or use parallel.cfg")):
        DenoisingStage(torch.nn.Linear(2, 2), None)

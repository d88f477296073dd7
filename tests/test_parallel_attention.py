"""diffstage's parallel attention on 2 gloo processes against attention over the whole sequence: uneven
splits, queries and keys of different lengths, key masks (a rank whose keys are all masked for a row, a rank
whose processor passes no mask because it masks nothing), and the Ring merge rule on its own."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_parallel import TORCHRUN


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_parallel_attention_equals_whole_attention(mode, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFSTAGE_DIST_TIMEOUT": "60"}
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node=2", str(REPO / "tests" / "attention_worker.py"),
                        str(tmp_path), mode], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / f"{mode}.json").read_text())
    print(mode, results)
    assert set(results) == {"uneven", "cross_lengths", "mask", "rank_masked", "one_rank_has_mask"}
    assert max(results.values()) <= 1e-5, results


def test_the_ring_merge_weighs_a_fully_masked_block_as_nothing():
    from diffstage.distributed.sequence import _block, _merge

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2, 4)
    mask = torch.zeros(1, 4)
    mask[0, 2:] = float("-inf")  # the second block's keys are all masked
    out, lse = _merge(*_block(q, k[:, :2], v[:, :2], mask[:, :2]), *_block(q, k[:, 2:], v[:, 2:], mask[:, 2:]))
    expected, _ = _block(q, k[:, :2], v[:, :2])
    assert torch.isfinite(out).all() and float((out - expected).abs().max()) <= 1e-6
    everything = torch.full((1, 4), float("-inf"))  # a row with no key to attend: 0, as sdpa gives
    out, _ = _merge(*_block(q, k[:, :2], v[:, :2], everything[:, :2]), *_block(q, k[:, 2:], v[:, 2:], everything[:, 2:]))
    assert torch.equal(out, torch.zeros_like(out))

"""torchrun across "nodes": two launcher processes (one per node, one process each) meet through a c10d
rendezvous on 127.0.0.1, as two machines would through --rdzv-endpoint, and parallel.ulysses=2 over them gives
the image one process gives."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO
from test_parallel import REQUEST, SIZES, TOL, TORCHRUN, reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_a_rendezvous_match_one_process(tiny_flux_dev, tmp_path):
    case = {"name": "two-nodes", "parallel": {"ulysses": 2}, "request": {**REQUEST, **SIZES["odd"]}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFSTAGE_DIST_TIMEOUT": "120"}
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([str(TORCHRUN), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=diffstage-test",
                               "--max-restarts=0", str(REPO / "tests" / "parallel_worker.py"), str(tiny_flux_dev),
                               str(tmp_path), json.dumps([case])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"two-nodes-rank{r}-reports.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # both ranks ran the case (one per node)
    diff = float(np.abs(np.load(tmp_path / "two-nodes.npy") - reference(tiny_flux_dev, "odd")).max())
    print(f"ulysses=2 over 2 nodes: max|Δ| = {diff:.3g}")
    assert diff <= TOL
    assert json.loads((tmp_path / "two-nodes.json").read_text())["bytes_sent"] > 0  # it communicated

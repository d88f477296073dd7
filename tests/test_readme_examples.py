"""The Python examples and shell commands in README.md run as written (those that need no download)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SECTIONS = ["### Building and editing pipelines from Python", "### Reusing stage outputs across calls"]


def python_block(section: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(section)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None and match.start() < text.find("\n### ", start + len(section)), section
    return match.group(1)


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_example_runs(section, tmp_path, monkeypatch):
    from diffstage.session import default_session

    default_session().reuse.clear()  # the reuse example starts from a new process's cache
    monkeypatch.chdir(tmp_path)
    exec(compile(python_block(section), f"README.md ({section})", "exec"), {})
    if section == SECTIONS[0]:
        assert (tmp_path / "my_digits.yaml").is_file()


# --- the README's shell commands, run as written ------------------------------------------------------------
# Every command of a ```bash block is either run or skipped below with its reason, so a command added to the
# README without a decision fails here. Commands that generate with the default model get
# `sampling.num_inference_steps=2` appended (a Hydra override, so the command is otherwise as written): the
# tests stay fast and the command line is the README's. `make` commands take no overrides and run as written.
FEW_STEPS = "sampling.num_inference_steps=2"
SKIPPED = {
    "make test": "the test suite itself",
    "source .venv/bin/activate": "the commands run with the environment's bin/ first on PATH, which is what it does",
    "diffstage generate model=flux model_path=black-forest-labs/FLUX.1-dev prompt=\"a red fox\" seed=0 "
    "sampling.num_inference_steps=28 sampling.height=1024 sampling.width=1024 runtime=cuda":
        "downloads FLUX.1-dev and needs CUDA",
    "torchrun --nproc-per-node=4 -m diffstage generate model=flux model_path=DIR runtime=cuda parallel.ulysses=2 "
    "parallel.ring=2": "needs a FLUX checkpoint (DIR) and CUDA",
    "torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m diffstage generate "
    "... parallel.cfg=2 parallel.ulysses=8": "needs two machines with 8 GPUs each",
    "python -m venv .venv && source .venv/bin/activate": "an installation (network)",
    "pip install torch==2.13.0 -e \".[test,triton,video,serve,lora,quant,sweep,ray]\"": "an installation (network)",
    "pip install -e \".[quant]\"": "an installation (network)",
    "pip install -e \".[lora]\"": "an installation (network)",
    "pip install -e \".[serve]\"": "an installation (network)",
    "diffstage serve serve.port=8000": "a server runs until stopped (tests/test_serve.py starts it and stops it)",
    "diffstage serve 'serve.models=[digits,{model:wan_t2v,model_path:DIR}]' serve.api_key=KEY serve.max_batch=16":
        "a server runs until stopped, with a Wan checkpoint (DIR)",
    "pip install torch --index-url https://download.pytorch.org/whl/cu124": "an installation (network)",
    "pip install -e \".[triton]\"": "an installation (network)",
    "pip install -e \".[video]\"": "an installation (network)",
    "srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d "
    "--rdzv-endpoint=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1):29500\" "
    "--rdzv-id=\"$SLURM_JOB_ID\" -m diffstage generate model=flux model_path=DIR runtime=cuda parallel.cfg=2 "
    "parallel.ulysses=8": "needs a SLURM cluster of 2 GPU nodes (tests/test_multinode.py runs the rendezvous on "
                          "127.0.0.1)",
    "diffstage serve serve.backend=ray serve.replicas=2":
        "a server runs until stopped (tests/test_serve_ray.py runs serve.backend=ray and stops it)",
    "diffstage serve serve.backend=ray serve.ray='{autoscaling_config: {min_replicas: 1, max_replicas: 4}}'":
        "a server runs until stopped (tests/test_serve_ray.py runs serve.backend=ray and stops it)",
    "diffstage serve serve.backend=ray serve.replicas=4 serve.ray_init='{address: auto}' "
    "serve.ray='{ray_actor_options: {num_cpus: 8}}'": "needs a running Ray cluster; a server runs until stopped",
    "diffstage generate -m hydra/launcher=submitit_local seed=0,1,2":
        "a minute of separate processes; tests/test_sweep_launchers.py runs submitit_local sweeps",
    "diffstage generate -m hydra/launcher=slurm hydra.launcher.partition=gpu seed='range(0,1000)' "
    "hydra.sweep.dir=/shared/sweeps/seeds": "needs a SLURM cluster (tests/test_sweep_launchers.py checks the config)",
    "diffstage generate -m hydra/sweeper=tune_cache cache=teacache objective.metric=seconds objective.psnr_min=30":
        "30 trials of 20 steps; tests/test_sweep_optuna.py runs it at 5 trials of 4 or 8 steps",
    "torchrun --nnodes=2 --node-rank=0 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 "
    "-m diffstage generate model=flux model_path=DIR runtime=cuda parallel.ulysses=16":
        "needs two machines with 8 GPUs each (tests/test_multinode.py runs the rendezvous on 127.0.0.1)",
    "diffstage generate runtime=cuda model=flux model_path=black-forest-labs/FLUX.1-dev":
        "downloads FLUX.1-dev and needs CUDA",
    "diffstage generate model=flux model_path=ckpt/ prompt=\"a red fox\" "
    "lora='[{path:style.safetensors,scale:0.8},{path:detail.safetensors,scale:0.5}]'":
        "needs a FLUX checkpoint and LoRA files (tests/test_lora.py runs the lora key through the CLI)",
}
# Commands the README gives in running text (checked to be there word for word); the exit status each must give.
INLINE = {
    'make demo PROMPT="a handwritten digit three"': 0,
    'make demo PROMPT="a handwritten digit three, thin strokes"': 0,
    "make sheet": 0,
    "diffstage sheet": 0,
    "diffstage generate -m seed=0,1,2 sampling.true_cfg_scale=2,4": 0,
    "diffstage graph digits": 0,
    "diffstage graph digits --png graph.png": 0,
    "diffstage validate sd3": 0,
    'diffstage generate "a red fox"': 2,  # the README's example of a mistake: a prompt without its key
}


def bash_commands() -> list[str]:
    """The commands of the README's ```bash blocks: continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    text = " ".join((REPO / "README.md").read_text().split())
    assert [c for c in SKIPPED if c not in bash_commands()] == []  # no stale entry
    assert [c for c in INLINE if f"`{c}`" not in text] == []


def _run_as_a_user(command: str, cwd):
    """`command` through bash in an empty folder, with this environment's bin/ first on PATH (as after
    `source .venv/bin/activate`) and make reading the repository's Makefile without reinstalling."""
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    if command.startswith("make "):  # the venv is this one, already installed
        command = command.replace("make ", f"make -s -f {REPO / 'Makefile'} -o .venv/.installed BIN={bin_dir} ", 1)
    elif re.match(r"(torchrun .*-m )?diffstage (generate|sheet)\b", command):
        command += f" {FEW_STEPS}"
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", list(dict.fromkeys(bash_commands() + list(INLINE))))
def test_readme_command_works_verbatim(command, tmp_path):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    if "--png" in command:
        try:
            import graphviz  # noqa: F401
        except ImportError:
            pytest.skip("--png needs the graphviz package (an optional install), not installed here")
        if shutil.which("dot") is None:
            pytest.skip("--png needs Graphviz's dot program, not installed here")
    r = _run_as_a_user(command, tmp_path)
    assert r.returncode == INLINE.get(command, 0), f"{command}\n{r.stderr[-3000:]}"
    if r.returncode:
        assert "Traceback" not in r.stderr and 'write prompt="a red fox"' in r.stderr
        return
    if "diffstage generate" in command or command.startswith(("make demo", "make sheet", "diffstage sheet")):
        written = [line for line in r.stdout.splitlines() if line.endswith((".png", ".jsonl"))]
        assert written and all(os.path.isfile(p) for p in written), r.stdout

"""`diffstage graph`: the stage graph as Mermaid text (and a PNG with Graphviz), from the static check alone."""
import re
import subprocess
import sys

import pytest

from conftest import REPO
from test_cli import run

from diffstage.builder import check_model
from diffstage.errors import DiffstageError
from diffstage.graph import NEEDS_GRAPHVIZ, REQUEST, render_png, stage_graph, to_dot, to_mermaid

DIGITS_STAGES = ("InputValidationStage", "TextEncodingStage", "LatentPreparationStage", "TimestepPreparationStage",
                 "DenoisingStage", "DecodingStage")
EDGE = re.compile(r'^    (\w+) -->\|"(.*)"\| (\w+)$')


def _edges(mermaid: str) -> dict[tuple[str, str], set[str]]:
    """(producer title, consumer title) -> fields, read back from the Mermaid text."""
    titles = {m[1]: m[2] for m in re.finditer(r'^    (\w+)\(?\["(.*?)(?:<br/>|")', mermaid, re.M)}
    edges = {}
    for line in mermaid.splitlines():
        m = EDGE.match(line)
        if m:
            fields = set(re.split(r",\s*|<br/>", m[2])) - {""}
            edges[titles[m[1]], titles[m[3]]] = fields
    return edges


def _graphviz_works() -> bool:
    try:
        import graphviz
    except ImportError:
        return False
    try:
        graphviz.Source("digraph { a }").pipe(format="png", quiet=True)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def digits_mermaid():
    r = run("graph", "digits")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_graph_digits_prints_mermaid(digits_mermaid):
    lines = digits_mermaid.splitlines()
    assert lines[0] == "flowchart TD"
    for i, name in enumerate(DIGITS_STAGES):
        assert f'    stage{i}["stages[{i}] {name}' in digits_mermaid
    edges = _edges(digits_mermaid)
    assert edges["stages[2] LatentPreparationStage", "stages[3] TimestepPreparationStage"] == {"latents"}
    into_denoising = edges["stages[1] TextEncodingStage", "stages[4] DenoisingStage"]
    assert {"prompt_embeds", "pooled_prompt_embeds"} <= into_denoising  # several fields, one edge
    # the latents the decoder reads are the denoised ones, not the first stage's
    assert "latents" in edges["stages[4] DenoisingStage", "stages[5] DecodingStage"]
    assert "latents" not in edges.get(("stages[2] LatentPreparationStage", "stages[5] DecodingStage"), set())
    assert "prompt" in edges["request", "stages[1] TextEncodingStage"]
    assert 'modules: transformer, vae<br/>callbacks: latent_shape, pack, position_ids"]' in digits_mermaid
    assert len(lines) == len(set(lines))  # one edge per pair of nodes


def test_graph_function_follows_the_latest_writer():
    graph = stage_graph(check_model("digits"))
    assert [n.id for n in graph.nodes] == [REQUEST] + [f"stage{i}" for i in range(len(DIGITS_STAGES))]
    assert graph.nodes[0].lines[0] == "request"
    flows = {(e.source, e.target): e.fields for e in graph.edges}
    assert flows["stage2", "stage3"] == ("latents",)
    assert "latents" in flows["stage4", "stage5"] and "latents" not in flows.get(("stage2", "stage5"), ())
    assert "timesteps" in flows["stage3", "stage4"]
    # TimestepPreparationStage writes num_inference_steps: later readers take it from there, not the request
    assert "num_inference_steps" in flows[REQUEST, "stage3"]
    for (source, target), fields in flows.items():
        assert list(fields) == sorted(fields) and len(set(fields)) == len(fields)
        assert source == REQUEST or int(source[5:]) < int(target[5:])
    # nodes and edges are the same in DOT
    dot = to_dot(graph)
    assert dot.startswith("digraph stages {") and "  stage2 -> stage3 [label=\"latents\"];" in dot


def test_graph_labels_are_escaped(tmp_path):
    # a module name with the characters that would end or break a Mermaid label, and a DOT string
    weird = 'te "x" #1 <b>|`y`'
    text = (REPO / "pipelines_yaml" / "flux.yaml").read_text()
    text = text.replace("\n  text_encoder:\n", '\n  "te \\"x\\" #1 <b>|`y`":\n', 1)
    text = text.replace("- text_encoder: text_encoder ", '- text_encoder: "te \\"x\\" #1 <b>|`y`" ', 1)
    path = tmp_path / "weird.yaml"
    path.write_text(text)
    graph = stage_graph(check_model(path))
    assert f"modules: {weird}, tokenizer," in graph.nodes[2].lines
    mermaid = to_mermaid(graph)
    assert "modules: te #quot;x#quot; #35;1 #60;b#62;#124;#96;y#96;, tokenizer," in mermaid
    for line in mermaid.splitlines()[1:]:  # ids are plain; a label holds no raw quote, < > | or backtick
        assert re.fullmatch(r'    \w+(\(\[|\[)"[^"<>|`]*(<br/>[^"<>|`]*)*"(\]\)|\])|    \w+ -->\|"[^"]*"\| \w+',
                            line), line
    assert 'modules: te \\"x\\" #1 <b>|`y`, tokenizer,' in to_dot(graph)


def test_graph_unknown_model_and_bad_yaml(tmp_path):
    r = run("graph", "no_such_model")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown model 'no_such_model'")
    assert "Traceback" not in r.stderr and r.stdout == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "pipelines_yaml" / "flux.yaml").read_text().replace("\nstages:", "\nstagse:", 1))
    r = run("graph", str(bad))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "unknown key 'stagse'" in r.stderr


def test_graph_png_without_graphviz_says_what_to_install(monkeypatch):
    # always runs: the graphviz package is hidden from this process
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with pytest.raises(DiffstageError) as info:
        render_png(stage_graph(check_model("digits")))
    assert str(info.value) == NEEDS_GRAPHVIZ
    assert "pip install graphviz" in NEEDS_GRAPHVIZ and "apt-get install graphviz" in NEEDS_GRAPHVIZ


def test_graph_png(tmp_path):
    out = tmp_path / "graph.png"
    r = run("graph", "digits", "--png", str(out))
    if _graphviz_works():
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(out.resolve()) and out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert [p.name for p in tmp_path.iterdir()] == ["graph.png"]  # no temporary file left
    else:  # this machine lacks the package or dot: the error says what to install
        expected = NEEDS_GRAPHVIZ if _no_graphviz_package() else "--png needs Graphviz's `dot` program"
        assert r.returncode == 2 and r.stderr.startswith(f"error: {expected}") and "Traceback" not in r.stderr
        assert "apt-get install graphviz" in r.stderr and r.stdout == ""
        assert list(tmp_path.iterdir()) == []


def _no_graphviz_package() -> bool:
    return subprocess.run([sys.executable, "-c", "import graphviz"], capture_output=True).returncode != 0


def test_graph_png_without_dot(tmp_path):
    """With the graphviz package but no dot program on PATH (skipped where the package is missing)."""
    if _no_graphviz_package():
        pytest.skip("the graphviz Python package is not installed (pip install graphviz)")
    out = tmp_path / "graph.png"
    r = run("graph", "digits", "--png", str(out), env={"PATH": str(tmp_path)})
    assert r.returncode == 2 and not out.exists()
    assert "--png needs Graphviz's `dot` program, which was not found on PATH" in r.stderr
    assert "apt-get install graphviz" in r.stderr


def test_graph_png_never_overwrites(tmp_path):
    out = tmp_path / "graph.png"
    out.write_bytes(b"mine")
    r = run("graph", "digits", "--png", str(out))
    assert r.returncode == 2
    assert r.stderr == f"error: '{out}' exists; diffstage never overwrites a file: remove it or choose another path\n"
    assert out.read_bytes() == b"mine"

"""The Python examples in README.md run as written (those that need no download)."""
import re

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

"""framework/ and stages/ never name a model family: model specifics live in models/ and pipelines_yaml/."""
import re

from conftest import REPO


def test_framework_names_no_model_family():
    families = [p.name for p in (REPO / "models").iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert families
    pattern = re.compile(r"\b(" + "|".join(families) + r")\b", re.IGNORECASE)
    offenders = [f"{path.relative_to(REPO)}:{i}: {line.strip()}"
                 for folder in ("framework", "stages") for path in sorted((REPO / folder).rglob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []

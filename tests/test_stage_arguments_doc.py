"""README's table of every standard-stage argument and its default agrees with the stages' signatures (and
EncoderConfig's fields): a new argument, or a changed default, fails here until the README says so."""
import inspect
import re

from conftest import REPO
from diffstage.stages import STANDARD_STAGES, EncoderConfig


def shown(value, name, cls=None) -> str:
    if cls is not None and name in cls.module_params:
        return name  # a module argument names a module: by default its own name
    if value is inspect.Parameter.empty or value is ...:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def documented(header: str) -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    table = text[text.index(header):].strip("\n").split("\n\n")[0].splitlines()[2:]
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in table]


def test_stage_argument_table_matches_the_signatures():
    rows = documented("| stage | argument | default | what it sets |")
    expected = [[cls.__name__, name, shown(p.default, name, cls)] for cls in STANDARD_STAGES
                for name, p in list(inspect.signature(cls.__init__).parameters.items())[1:]
                if not (cls.takes_all_modules and name in ("modules", "pipeline_class"))]
    assert [row[:3] for row in rows] == expected
    assert all(row[3] for row in rows)  # each says what it sets


def test_encoder_table_matches_encoder_config():
    rows = documented("\n| argument | default | what it sets |")
    expected = [[name, "required" if f.is_required() else shown(f.default, name)]
                for name, f in EncoderConfig.model_fields.items()]
    assert [row[:2] for row in rows] == expected
    assert all(row[2] for row in rows)

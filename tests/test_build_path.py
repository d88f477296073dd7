"""One straight build path: the run config parsed once, the model checked once, the request built and checked
once before any weight loads and then run as it is; objects constructed complete."""
import numpy as np
import pytest

from diffstage import RequestError, build_from_config, run_config
from diffstage.builder import compose_config, plan_from_config
from diffstage.cli import main
from diffstage.session import Session

FAST = ["sampling.num_inference_steps=2", "sampling.output_type=np"]


def counting(monkeypatch, module, name):
    """Count the calls of module.name (still calling it)."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_bad_request_is_reported_before_the_missing_checkpoint(capsys, tmp_path):
    """The request is checked before the build looks for weights: flux.yaml has no model_path, and the
    request's error is the one reported."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "model=flux", "sampling.height=7", f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "height must be a positive multiple of 16 (at most 65536), got 7" in err and "model_path" not in err
    with pytest.raises(RequestError, match="height"):
        plan_from_config(compose_config(["model=flux"])).request(prompt="a fox", height=7)


def test_the_checked_request_is_the_one_that_runs():
    session = Session()
    plan = plan_from_config(compose_config(FAST))
    req = plan.request(prompt="a handwritten digit seven", seed=3)
    pipe = plan.load(session)
    planned = pipe.run(req)
    assert planned.req is req
    called = pipe("a handwritten digit seven", seed=3)  # the same request, made by the pipeline
    np.testing.assert_allclose(planned.images, called.images, atol=1e-6)  # same process and layout


def test_the_pipeline_is_built_complete():
    session = Session()
    pipe = build_from_config(compose_config(FAST + ["reuse.max_mb=3"]), session=session)
    assert pipe.reuse is session.reuse and pipe.reuse_max_bytes == 3 * 2 ** 20
    assert sorted(pipe.module_keys) == sorted(id(m) for m in pipe.modules.values())
    assert all(stage.declared is not None for stage in pipe.stages)
    off = build_from_config(compose_config(FAST + ["reuse.enabled=false"]), session=session)
    assert off.reuse is None


def test_generate_parses_and_checks_once(monkeypatch, tmp_path, capsys):
    from diffstage import model_check

    parsed = counting(monkeypatch, run_config, "plain_run_config")
    checked = counting(monkeypatch, model_check, "check_data")
    main(["generate", f"hydra.run.dir={tmp_path}", "sampling.num_inference_steps=2"])
    assert (tmp_path / "image.png").exists()
    assert len(parsed) == 1 and len(checked) == 1

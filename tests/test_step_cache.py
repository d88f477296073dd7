"""Step caches (cache=first_block|teacache): exact at threshold 0, the schedule they promise, CFG batched or
not, their errors, and a quality gate on `digits` against the uncached images."""
import numpy as np
import pytest
import torch

from conftest import REPO
from test_cli import run
from diffstage import DiffstageError, build_pipeline
from diffstage.quality import psnr, ssim
from diffstage.step_cache import StepCache, make_step_cache

REQUEST = dict(prompt="a red fox", negative_prompt="blurry", true_cfg_scale=4.0, seed=3, num_inference_steps=10,
               height=32, width=32, max_sequence_length=16)
KINDS = ("first_block", "teacache")


def generate(checkpoint, overrides=(), cfg_batch=True, **request):
    pipe = build_pipeline("flux", model_path=checkpoint, overrides=["reuse.enabled=false", *overrides])
    pipe.stages[4].cfg_batch = cfg_batch
    out = pipe(**{**REQUEST, **request}, output_type="np")
    return out.images, out.reports.get("4:DenoisingStage", {}).get("step_cache")


@pytest.mark.parametrize("cfg_batch", [True, False], ids=["cfg-batched", "cfg-two-calls"])
@pytest.mark.parametrize("kind", KINDS)
def test_threshold_zero_computes_every_step_and_matches_uncached_exactly(tiny_flux_dev, kind, cfg_batch):
    expected, none = generate(tiny_flux_dev, cfg_batch=cfg_batch)
    ours, stats = generate(tiny_flux_dev, [f"cache={kind}", "cache.threshold=0"], cfg_batch=cfg_batch)
    calls = REQUEST["num_inference_steps"] * (1 if cfg_batch else 2)
    assert none is None and stats == {"kind": kind, "threshold": 0, "computed": calls, "cached": 0}
    assert float(np.abs(ours - expected).max()) == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("settings, computed, cached", [
    (["cache.warmup=3", "cache.final=2"], 5, 5),  # steps 3..7 skippable, all skipped
    (["cache.warmup=3", "cache.final=2", "cache.max_in_row=2"], 6, 4),  # skip, skip, compute, skip, skip
    (["cache.warmup=0", "cache.final=0"], 1, 9),  # the first step has nothing to reuse
])
def test_warmup_final_and_max_in_row_bound_what_is_skipped(tiny_flux_dev, kind, settings, computed, cached):
    _, stats = generate(tiny_flux_dev, [f"cache={kind}", "cache.threshold=100", *settings])
    assert (stats["computed"], stats["cached"]) == (computed, cached)


@pytest.mark.parametrize("kind", KINDS)
def test_two_cfg_calls_keep_a_state_per_branch(tiny_flux_dev, kind):
    """Without batching, the conditional and unconditional calls are cached apart; each skips alike here."""
    _, stats = generate(tiny_flux_dev, [f"cache={kind}", "cache.threshold=100", "cache.warmup=2"], cfg_batch=False)
    assert stats["computed"] == 2 * 3 and stats["cached"] == 2 * 7  # warmup 2 + final 1, per branch


@pytest.mark.parametrize("kind", KINDS)
def test_a_skipped_call_adds_its_own_branch_residual(kind):
    """Blocks that add +1 for 'cond' and +10 for 'uncond': a skipped step of each branch adds that branch's
    residual, not the other's (one shared state would hand 'cond' the +10 it saw last)."""
    cache = StepCache(kind=kind, threshold=100, warmup=1, final=0)
    cache.begin(3)
    offsets = {"cond": 1.0, "uncond": 10.0}
    hidden, context = torch.ones(1, 4, 2), torch.zeros(1, 3, 2)
    for step in range(3):
        for branch, offset in offsets.items():
            cache.at(step, branch)
            out, _ = cache(lambda h, c, start, stop, o=offset: (h + o * (stop - start), c), hidden, context, 3,
                           lambda: hidden)
            assert torch.equal(out, hidden + 3 * offset), (step, branch)
    assert (cache.computed, cache.cached) == (2, 4)
    cache.end()
    assert cache.stats()["cached"] == 4 and not cache._branches  # counts kept, tensors dropped


@pytest.mark.parametrize("kind", KINDS)
def test_a_cached_run_stays_close_and_extrapolation_changes_it(tiny_flux_dev, kind):
    expected, _ = generate(tiny_flux_dev)
    threshold = "0.3"
    plain, stats = generate(tiny_flux_dev, [f"cache={kind}", f"cache.threshold={threshold}"])
    extrapolated, _ = generate(tiny_flux_dev, [f"cache={kind}", f"cache.threshold={threshold}",
                                               "cache.extrapolate=true"])
    assert stats["cached"] >= 3 and stats["computed"] >= 3
    assert 0 < float(np.abs(plain - expected).max()) < 0.05
    assert float(np.abs(extrapolated - plain).max()) > 0


def test_each_run_starts_afresh_and_a_pipeline_without_cache_reports_nothing(tiny_flux_dev):
    # warmup 0: a residual left over from the first run would be reused at the second run's first step
    pipe = build_pipeline("flux", model_path=tiny_flux_dev, overrides=["cache=teacache", "cache.threshold=100",
                                                                        "cache.warmup=0", "reuse.enabled=false"])
    first = pipe(**REQUEST, output_type="np")
    second = pipe(**REQUEST, output_type="np")
    assert first.reports["4:DenoisingStage"]["step_cache"]["computed"] == 2  # the first step and the last
    assert first.reports == second.reports and np.array_equal(first.images, second.images)
    assert not pipe.stages[4].step_cache._branches  # nothing held between runs
    assert build_pipeline("flux", model_path=tiny_flux_dev)(**REQUEST, output_type="np").reports == {}


def test_settings_that_do_nothing_are_named_in_a_warning(caplog):
    with caplog.at_level("WARNING", logger="diffstage.step_cache"):
        assert make_step_cache({"kind": "none", "threshold": 0.2}) is None
        make_step_cache({"kind": "none", "threshold": 0.2, "warmup": 3})
        make_step_cache({"kind": "first_block", "coefficients": [1, 0]})
        make_step_cache({"kind": "teacache", "compute_first": 2, "threshold": 0.1})
    assert [r.getMessage() for r in caplog.records] == [
        "cache.threshold=0.2: no step cache is chosen, so it does nothing (add cache=teacache or cache=first_block)",
        "cache.threshold=0.2, cache.warmup=3: no step cache is chosen, so they do nothing (add cache=teacache or "
        "cache=first_block)",
        "cache.coefficients=[1, 0]: cache=first_block does not use it",
        "cache.compute_first=2: cache=teacache does not use it"]


def test_model_yaml_settings_sit_under_the_run_config():
    model = {"teacache": {"threshold": 0.3, "warmup": 4}}
    cache = make_step_cache({"kind": "teacache", "threshold": 0.1, "warmup": None}, model)
    assert (cache.kind, cache.threshold, cache.warmup) == ("teacache", 0.1, 4)
    assert make_step_cache({"kind": "none", "threshold": 0.1}, model) is None
    assert isinstance(make_step_cache({"kind": "first_block"}), StepCache)


@pytest.mark.parametrize("args, message", [
    (["cache=teacache", "cache.threshold=-1"], "cache.threshold must be a finite number in [0, 100], got -1"),
    (["cache=teacache", "cache.threshold=nan"], "cache.threshold must be a finite number in [0, 100], got nan"),
    (["cache=first_block", "cache.compute_first=0"], "cache.compute_first must be a whole number in [1, 10000], got 0"),
    (["cache=teacache", "cache.extrapolate=maybe"], "cache.extrapolate must be true or false, got 'maybe'"),
    (["cache=teacache", "+cache.thresold=0.1"], "unknown key 'cache.thresold' (did you mean 'threshold'?)"),
    (["cache=teacache", "cache.coefficients=[]"], "cache.coefficients must be a non-empty list of finite numbers"),
    (["cache.kind=sometimes"], "cache.kind must be one of none, first_block, teacache, got 'sometimes'"),
    (["cache=bogus"], "Could not find 'cache/bogus'"),
])
def test_bad_cache_settings_exit_2_before_anything_loads(args, message):
    r = run("generate", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_transformer_without_step_cache_support_is_refused(tiny_flux_dev, flux_yaml_variant):
    """The Diffusers transformer (no `step_cache` hook) with cache=...: a clear error naming the stage."""
    yaml = flux_yaml_variant(("_target_: diffstage.models.flux.transformer.FluxTransformer",
                              "_target_: diffusers.FluxTransformer2DModel"))
    with pytest.raises(DiffstageError, match=r"model\.yaml:\d+: stages\[4\] DenoisingStage: cache=teacache: "
                                             r"FluxTransformer2DModel does not support step caches"):
        build_pipeline(yaml, model_path=tiny_flux_dev, overrides=["cache=teacache"])


def test_a_model_without_a_stage_that_takes_a_cache_is_refused():
    from diffstage import check_model
    from diffstage.builder import attach_step_cache

    with pytest.raises(DiffstageError, match="cache=teacache: model 'digits' has no stage that takes a step cache "
                                             r"\(DenoisingStage does\); use cache=none"):
        attach_step_cache([], make_step_cache({"kind": "teacache"}), check_model("digits"))


def test_model_yaml_step_cache_section_is_checked(tmp_path):
    yaml = tmp_path / "m.yaml"
    text = (REPO / "pipelines_yaml" / "digits.yaml").read_text().split("step_cache:")[0]
    yaml.write_text(text + "step_cache:\n  fbcache: {threshold: 0.1}\n  teacache: {threshold: fast}\n")
    r = run("validate", str(yaml))
    assert r.returncode == 2, r.stderr
    assert "unknown step cache kind 'fbcache'; known: first_block, teacache" in r.stderr
    assert "step_cache.teacache.threshold must be a finite number in [0, 100], got 'fast'" in r.stderr
    assert f"{yaml}:" in r.stderr


def test_cli_logs_what_the_cache_spared(tmp_path):
    r = run("generate", "cache=teacache", "cache.threshold=0.2", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "4:DenoisingStage: step cache teacache (threshold 0.2): " in r.stderr
    assert "of 20 transformer calls taken from the cache" in r.stderr


@pytest.fixture(scope="module")
def digits_images():
    """50 digits (5 per digit) at seeds the digits gate does not use, uncached and with the README's setting."""
    from diffstage.models.digits import data

    def images(overrides):
        pipe = build_pipeline("digits", overrides=overrides)
        out = [pipe(data.prompt(d), seed=7000 + 5 * d + k, output_type="np") for d in range(10) for k in range(5)]
        cached = sum(o.reports.get("4:DenoisingStage", {}).get("step_cache", {}).get("cached", 0) for o in out)
        return np.concatenate([o.images for o in out]), cached

    labels = np.repeat(np.arange(10), 5)
    return labels, images([]), images(["cache=teacache"])


def test_quality_gate_for_the_recommended_cache_on_digits(digits_images):
    """cache=teacache with the digits YAML's threshold against uncached on the same seeds: mean PSNR >= 30 dB,
    SSIM >= 0.98, and the classifier's accuracy within 4 points (2 images of 50)."""
    from diffstage.models.digits.classifier import classify

    labels, (exact, _), (cached, skipped) = digits_images
    p, s = np.minimum(psnr(cached, exact), 100), ssim(cached, exact)
    acc_exact, acc_cached = (classify(exact) == labels).mean(), (classify(cached) == labels).mean()
    print(f"teacache on digits: {skipped} of {50 * 20} steps cached; PSNR mean {p.mean():.1f} min {p.min():.1f} dB; "
          f"SSIM mean {s.mean():.4f} min {s.min():.4f}; accuracy {acc_cached:.0%} vs {acc_exact:.0%} uncached")
    assert skipped >= 0.3 * 50 * 20  # it does skip
    assert p.mean() >= 30 and s.mean() >= 0.98
    assert abs(acc_cached - acc_exact) <= 0.04


def test_the_quality_measures_can_fail():
    """PSNR and SSIM tell a changed image from the same one."""
    rng = np.random.default_rng(0)
    a = rng.random((2, 32, 32, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert np.isinf(psnr(a, a)).all() and np.allclose(ssim(a, a), 1.0)
    assert (psnr(b, a) < 25).all() and (ssim(b, a) < 0.95).all()
    # scikit-image's structural_similarity (gaussian_weights, sigma 1.5, population covariance) gives 0.945857
    # for the first pair: checked by hand, as scikit-image is not a dependency
    assert abs(float(ssim(b[:1], a[:1])[0]) - 0.945857) < 1e-6
    assert abs(float(psnr(a[:1] * 0 + 0.5, a[:1] * 0 + 0.6)[0]) - 20.0) < 1e-9  # MSE 0.01 -> 20 dB

"""Every kernel implementation matches the reference (the spec) over shapes and dtypes;
`runtime.kernels` names resolve with clear errors."""
import importlib.util

import pytest
import torch

from diffstage.errors import DiffstageError
from diffstage.kernels import get_kernels, reference, resolve_kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None
IMPLS = ["compiled", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]
SHAPES = [(1, 7, 64), (2, 33, 96)]  # [batch, seq, dim]; 96 is not a power of two


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(actual, expected, tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_norms_and_residual_match_reference(impl, dtype, tol, shape):
    ops = get_kernels(impl)
    batch, _, dim = shape
    x, y = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, seed=1)
    shift, scale, gate, weight = (rand(batch, dim, dtype=dtype, seed=s) for s in (2, 3, 4, 5))
    assert_close(ops.rms_norm(x, weight[0], 1e-6), reference.rms_norm(x, weight[0], 1e-6), tol)
    assert_close(ops.rms_norm(x, None, 1e-5), reference.rms_norm(x, None, 1e-5), tol)
    assert_close(ops.modulate(x, shift, scale), reference.modulate(x, shift, scale), tol)
    assert_close(ops.gated_residual(x, y, gate), reference.gated_residual(x, y, gate), tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("layout", ["interleaved", "split_half"])
@pytest.mark.parametrize("shape", [(1, 5, 2, 16), (2, 9, 3, 24)])  # [batch, seq, heads, head_dim]
def test_rope_matches_reference(impl, dtype, tol, layout, shape):
    ops = get_kernels(impl)
    x = rand(*shape, dtype=dtype)
    angles = rand(shape[1], shape[3], seed=7)
    cos, sin = angles.cos(), angles.sin()
    assert_close(ops.apply_rope(x, cos, sin, layout), reference.apply_rope(x, cos, sin, layout), tol)


def test_kernels_would_notice_a_wrong_result():
    """The comparison used above fails on a kernel that is off by one bf16 step's worth."""
    x = rand(2, 5, 64)
    with pytest.raises(AssertionError):
        assert_close(reference.rms_norm(x) * 1.01, reference.rms_norm(x), 1e-5)


def test_auto_picks_by_device():
    assert resolve_kernels("auto", "cpu") == "reference"
    assert get_kernels("auto", "cpu").name == "reference"
    assert resolve_kernels("compiled", "cpu") == "compiled"


def test_unknown_kernels_name_lists_the_choices():
    with pytest.raises(DiffstageError, match=r"unknown kernels 'fast'; choose one of: auto, reference, compiled, "
                                             r"triton"):
        resolve_kernels("fast")


def test_triton_outside_the_interpreter_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expected = r"Triton kernels need a CUDA device \(this run is on 'cpu'\)" if HAS_TRITON else "not installed"
    with pytest.raises(DiffstageError, match=r"kernels 'triton' cannot run: .*" + expected):
        resolve_kernels("triton", "cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_wrappers_refuse_shapes_they_would_read_past():
    ops = get_kernels("triton")
    x = rand(2, 5, 32)
    with pytest.raises(ValueError, match=r"modulate: shift must be \[batch, dim\] = \[2, 32\], got \[1, 32\]"):
        ops.modulate(x, rand(1, 32), rand(2, 32))
    with pytest.raises(ValueError, match=r"gated_residual: y must have x's shape \[2, 5, 32\], got \[2, 4, 32\]"):
        ops.gated_residual(x, rand(2, 4, 32), rand(2, 32))
    with pytest.raises(ValueError, match=r"rms_norm: weight must be \[32\], got \[16\]"):
        ops.rms_norm(x, rand(16))
    with pytest.raises(ValueError, match=r"apply_rope: cos and sin must be \[seq, head_dim\] = \[5, 8\]"):
        ops.apply_rope(rand(1, 5, 2, 8), rand(4, 8), rand(4, 8))


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_rope_refuses_an_odd_head_dim(impl):
    ops = get_kernels(impl) if impl != "reference" else reference
    with pytest.raises(ValueError, match=r"apply_rope: head_dim must be even, got 7"):
        ops.apply_rope(rand(1, 3, 2, 7), rand(3, 7), rand(3, 7))

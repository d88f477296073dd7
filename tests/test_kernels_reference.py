"""The reference kernels agree with the Diffusers layers whose math they specify."""
import pytest
import torch
import torch.nn.functional as F

from diffstage.kernels import apply_rope, gated_residual, modulate, rms_norm

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def assert_close(actual, expected, tol):
    """Absolute `tol`, plus one bfloat16 rounding step relative to the value for bf16 runs."""
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=1.6e-2 if tol > 1e-4 else 1e-5)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_rms_norm_matches_diffusers(dtype, tol):
    from diffusers.models.normalization import RMSNorm

    x = rand(2, 9, 64, dtype=dtype)
    layer = RMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(rand(64, seed=1))
        expected = layer(x)
    assert_close(rms_norm(x, layer.weight, 1e-6), expected, tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_modulate_and_gate_match_adaln_math(dtype, tol):
    x, shift, scale, gate, y = rand(2, 5, 32, dtype=dtype), rand(2, 32, seed=1), rand(2, 32, seed=2), \
        rand(2, 32, seed=3), rand(2, 5, 32, dtype=dtype, seed=4)
    norm = torch.nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)
    expected = norm(x.float()) * (1 + scale[:, None]) + shift[:, None]  # as in AdaLayerNormZero
    assert_close(modulate(x, shift, scale), expected, tol)
    assert_close(gated_residual(x, y, gate), x.float() + gate[:, None] * y.float(), tol)


@pytest.mark.parametrize("layout, unbind_dim", [("interleaved", -1), ("split_half", -2)])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_rope_matches_diffusers(layout, unbind_dim, dtype, tol):
    from diffusers.models.embeddings import apply_rotary_emb

    x = rand(2, 7, 3, 16, dtype=dtype)  # [batch, seq, heads, head_dim]
    angles = rand(7, 8, seed=5)
    if layout == "interleaved":
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    else:
        cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    expected = apply_rotary_emb(x.transpose(1, 2), (cos, sin), use_real=True, use_real_unbind_dim=unbind_dim)
    out = apply_rope(x, cos, sin, layout)
    assert out.dtype == dtype
    assert_close(out, expected.transpose(1, 2), tol)
    # a rotation keeps each pair's norm
    assert torch.allclose(out.float().norm(dim=-1), x.float().norm(dim=-1), atol=tol * 10)


def test_rope_rejects_unknown_layout():
    with pytest.raises(ValueError, match="layout must be 'interleaved' or 'split_half'"):
        apply_rope(rand(1, 2, 1, 4), rand(2, 4), rand(2, 4), "halves")

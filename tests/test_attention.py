"""The attention layer: every backend matches `reference`; unknown backends fail clearly."""
import pytest
import torch

from diffstage import DiffstageError
from diffstage.attention import attention, available_backends, get_backend
from diffstage.attention.backends import reference

SHAPES = [(1, 5, 2, 8), (2, 16, 4, 32), (3, 7, 1, 64)]


def qkv(shape, dtype, seq_k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s, h, d = shape
    k_shape = (b, seq_k or s, h, d)
    return (torch.randn(shape, generator=g).to(dtype), torch.randn(k_shape, generator=g).to(dtype),
            torch.randn(k_shape, generator=g).to(dtype))


def test_reference_is_softmax_attention():
    q, k, v = qkv((1, 3, 1, 4), torch.float32)
    weights = torch.softmax(q[0, :, 0] @ k[0, :, 0].T / 2.0, dim=-1)  # sqrt(4) = 2
    assert torch.allclose(reference(q, k, v)[0, :, 0], weights @ v[0, :, 0], atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "reference"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_backend_matches_reference(backend, shape, dtype, tol):
    q, k, v = qkv(shape, dtype, seq_k=shape[1] + 3)  # cross-attention lengths differ
    out = attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert (out.float() - reference(q, k, v).float()).abs().max() <= tol


@pytest.mark.parametrize("backend", [b for b in available_backends() if b in ("sdpa", "reference")])
def test_masks(backend):
    q, k, v = qkv((2, 6, 2, 16), torch.float32)
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[..., 4:] = False  # the last two keys are padding
    out = attention(q, k, v, mask=keep, backend=backend)
    assert torch.allclose(out, reference(q[:, :, :, :], k[:, :4], v[:, :4]), atol=1e-5)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~keep, float("-inf"))
    assert torch.allclose(attention(q, k, v, mask=additive, backend=backend), out, atol=1e-5)


def test_unknown_and_missing_backends():
    with pytest.raises(DiffstageError, match=r"^unknown attention backend 'spda'; available: reference, sdpa"):
        get_backend("spda")
    if "flash_attn" not in available_backends():
        with pytest.raises(DiffstageError, match="needs the 'flash_attn' package, which is not installed"):
            attention(*qkv((1, 2, 1, 8), torch.float32), backend="flash_attn")


def test_shape_errors():
    q, k, v = qkv((1, 4, 2, 8), torch.float32)
    with pytest.raises(DiffstageError, match=r"expects q, k, v as \[batch, seq, heads, head_dim\]"):
        attention(q[0], k, v)
    with pytest.raises(DiffstageError, match="must share batch, heads and head_dim"):
        attention(q, k[..., :4], v[..., :4])


def test_attention_choice_command_line_then_model_yaml_then_sdpa():
    import types

    from diffstage.builder import compose_config, execution_options

    yaml_says = types.SimpleNamespace(attention="reference")
    yaml_silent = types.SimpleNamespace(attention=None)
    assert compose_config().attention.backend is None
    assert execution_options(compose_config(), yaml_silent, torch.device("cpu"))["attention"] == "sdpa"
    assert execution_options(compose_config(), yaml_says, torch.device("cpu"))["attention"] == "reference"
    explicit = compose_config(["attention=sdpa"])
    assert execution_options(explicit, yaml_says, torch.device("cpu"))["attention"] == "sdpa"


def test_unknown_attention_or_kernels_fail_before_loading():
    import types

    from diffstage.builder import compose_config, execution_options

    spec = types.SimpleNamespace(attention=None)
    with pytest.raises(DiffstageError, match=r"unknown attention backend 'flash'; available: reference, sdpa"):
        execution_options(compose_config(["attention.backend=flash"]), spec, torch.device("cpu"))
    with pytest.raises(DiffstageError, match=r"unknown kernels 'fastest'"):
        execution_options(compose_config(["runtime.kernels=fastest"]), spec, torch.device("cpu"))

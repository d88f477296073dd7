"""Native FLUX.1 transformer: the math of Diffusers' FluxTransformer2DModel on diffstage's
attention layer and kernels, with the same parameter names, so its checkpoints load as they are.

Shapes: image tokens [B, N, in_channels], text tokens [B, T, joint_attention_dim];
attention runs over the T + N joint sequence, text first."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffstage.attention import attention
from diffstage.kernels import Kernels
from diffstage.native import Linear, ModelConfig, NativeModel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (Diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def timestep_features(t: torch.Tensor, channels: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t (already scaled to [0, 1000]), cos half first."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimeTextEmbedding(nn.Module):
    """Conditioning vector: embed(t) [+ embed(guidance)] + embed(pooled text)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep, guidance, pooled):
        emb = self.timestep_embedder(timestep_features(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_features(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0):
    """cos/sin [seq, head_dim] for 3-axis position ids [seq, 3], pairs interleaved."""
    cos, sin = [], []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = torch.outer(ids[:, axis].float().double(), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


class AdaNorm(nn.Module):
    """Projects the conditioning vector to `chunks` modulation vectors (shift, scale, gate, ...)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.chunks, dim=1)


class GeluProjection(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = Linear(dim, hidden)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """net.0.proj -> GELU(tanh) -> net.2, as Diffusers names it (net.1 is a parameterless dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GeluProjection(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class Attention(nn.Module):
    """q/k/v projections with per-head RMSNorm; `joint` adds the text stream's own projections."""

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, out: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_q, self.to_k, self.to_v = (Linear(dim, inner) for _ in range(3))
        if out:
            self.to_out = nn.ModuleList([Linear(inner, dim), nn.Identity()])
        if joint:
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (Linear(dim, inner) for _ in range(3))
            self.to_add_out = Linear(inner, dim)

    def qkv(self, x, ops: Kernels, added: bool = False):
        """[B, S, dim] -> normalised q, k and v as [B, S, heads, head_dim]."""
        prefix = ("add_", "_proj", "norm_added_") if added else ("to_", "", "norm_")
        proj = [getattr(self, f"{prefix[0]}{n}{prefix[1]}")(x).unflatten(-1, (self.heads, self.head_dim))
                for n in "qkv"]
        q_norm, k_norm = getattr(self, f"{prefix[2]}q"), getattr(self, f"{prefix[2]}k")
        return ops.rms_norm(proj[0], q_norm.weight, q_norm.eps), ops.rms_norm(proj[1], k_norm.weight, k_norm.eps), \
            proj[2]

    def attend(self, q, k, v, rope, ops: Kernels, backend: str) -> torch.Tensor:
        cos, sin = rope
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        return attention(q, k, v, backend=backend).flatten(2)


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """Keep float16 activations finite, where Diffusers does."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleStreamBlock(nn.Module):
    """Text and image keep their own weights and attend jointly."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = Attention(dim, heads, head_dim, joint=True, out=True)
        self.ff, self.ff_context = FeedForward(dim), FeedForward(dim)

    def forward(self, img, txt, temb, rope, ops: Kernels, backend: str):
        img_mod, txt_mod = self.norm1(temb), self.norm1_context(temb)
        # modulation vectors: shift, scale, gate for attention, then for the MLP
        img_q, img_k, img_v = self.attn.qkv(ops.modulate(img, img_mod[0], img_mod[1]), ops)
        txt_q, txt_k, txt_v = self.attn.qkv(ops.modulate(txt, txt_mod[0], txt_mod[1]), ops, added=True)
        joint = self.attn.attend(torch.cat([txt_q, img_q], 1), torch.cat([txt_k, img_k], 1),
                                 torch.cat([txt_v, img_v], 1), rope, ops, backend)
        txt_attn, img_attn = joint[:, :txt.shape[1]], joint[:, txt.shape[1]:]

        img = ops.gated_residual(img, self.attn.to_out[0](img_attn), img_mod[2])
        img = ops.gated_residual(img, self.ff(ops.modulate(img, img_mod[3], img_mod[4])), img_mod[5])
        txt = ops.gated_residual(txt, self.attn.to_add_out(txt_attn), txt_mod[2])
        txt = ops.gated_residual(txt, self.ff_context(ops.modulate(txt, txt_mod[3], txt_mod[4])), txt_mod[5])
        return img, clip_fp16(txt)


class SingleStreamBlock(nn.Module):
    """One stream over [text; image]: attention and MLP in parallel from one modulated input."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = Linear(dim, int(dim * mlp_ratio))
        self.proj_out = Linear(dim + int(dim * mlp_ratio), dim)
        self.attn = Attention(dim, heads, head_dim, joint=False, out=False)

    def forward(self, x, temb, rope, ops: Kernels, backend: str):
        shift, scale, gate = self.norm(temb)
        normed = ops.modulate(x, shift, scale)
        attn = self.attn.attend(*self.attn.qkv(normed, ops), rope, ops, backend)
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")
        return clip_fp16(ops.gated_residual(x, self.proj_out(torch.cat([attn, mlp], dim=2)), gate))


class OutputNorm(nn.Module):
    """Final adaptive LayerNorm; its projection gives scale first, then shift."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 2 * dim)

    def forward(self, x, temb, ops: Kernels):
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return ops.modulate(x, shift, scale)


class FluxTransformer(NativeModel):
    """Drop-in for Diffusers' FluxTransformer2DModel: same config.json and weights, and the call
    arguments FLUX pipelines pass (no ControlNet residuals or joint_attention_kwargs)."""

    repeated_blocks = ("transformer_blocks", "single_transformer_blocks")
    # Sequence parallelism (diffstage.distributed): the image and text tokens and their position ids are split
    # over the ranks; every op but attention is per token, RoPE comes from each token's own ids, and the joint
    # attention runs across the ranks. The prediction is gathered along the image tokens.
    sequence_parallel_plan = {"hidden_states": 1, "encoder_hidden_states": 1, "img_ids": 0, "txt_ids": 0}
    sequence_parallel_output = 1

    def __init__(self, patch_size: int = 1, in_channels: int = 64, out_channels: int | None = None,
                 num_layers: int = 19, num_single_layers: int = 38, attention_head_dim: int = 128,
                 num_attention_heads: int = 24, joint_attention_dim: int = 4096, pooled_projection_dim: int = 768,
                 guidance_embeds: bool = False, axes_dims_rope: tuple[int, ...] = (16, 56, 56)):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope {list(axes_dims_rope)} must sum to attention_head_dim "
                             f"({attention_head_dim})")
        self.config = ModelConfig(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds,
            axes_dims_rope=tuple(axes_dims_rope))
        dim = num_attention_heads * attention_head_dim
        self.time_text_embed = TimeTextEmbedding(dim, pooled_projection_dim, guidance_embeds)
        self.context_embedder = Linear(joint_attention_dim, dim)
        self.x_embedder = Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_single_layers))
        self.norm_out = OutputNorm(dim)
        self.proj_out = Linear(dim, patch_size * patch_size * (out_channels or in_channels))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor | None = None, return_dict: bool = True,
                step_cache=None):
        """timestep and guidance in [0, 1] per batch item (scaled by 1000 inside, as in Diffusers);
        img_ids / txt_ids: [seq, 3] position ids; step_cache: this run's diffstage.step_cache.StepCache
        (an argument, as the module is shared by pipelines). Returns ([B, N, out_channels],) when not
        return_dict."""
        ops, backend = self.ops, self.attention_backend
        if guidance is None and self.config.guidance_embeds:
            raise ValueError("this FLUX transformer embeds the guidance scale: pass `guidance`")
        img = self.x_embedder(hidden_states)
        guidance = guidance.to(img.dtype) * 1000 if guidance is not None else None
        temb = self.time_text_embed(timestep.to(img.dtype) * 1000, guidance, pooled_projections)
        txt = self.context_embedder(encoder_hidden_states)
        rope = rope_tables(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope)

        blocks = len(self.transformer_blocks) + len(self.single_transformer_blocks)
        if step_cache is None:
            img, txt = self.run_blocks(img, txt, 0, blocks, temb, rope)
        else:  # the cache may add a remembered residual instead of running (most of) the blocks
            img, txt = step_cache(lambda h, c, start, stop: self.run_blocks(h, c, start, stop, temb, rope),
                                       img, txt, blocks, probe=lambda x=img: self.cache_probe(x, temb))
        out = self.proj_out(self.norm_out(img, temb, ops))
        return {"sample": out} if return_dict else (out,)

    def run_blocks(self, img, txt, start: int, stop: int, temb, rope):
        """Blocks [start, stop) of the double-stream blocks followed by the single-stream ones."""
        ops, backend, doubles = self.ops, self.attention_backend, len(self.transformer_blocks)
        for block in self.transformer_blocks[start:stop]:
            img, txt = block(img, txt, temb, rope, ops, backend)
        if stop > doubles:
            x = torch.cat([txt, img], dim=1)
            for block in self.single_transformer_blocks[max(start - doubles, 0):stop - doubles]:
                x = block(x, temb, rope, ops, backend)
            txt, img = x[:, :txt.shape[1]], x[:, txt.shape[1]:]
        return img, txt

    def cache_probe(self, img, temb):
        """TeaCache's measure: the first block's modulated image input."""
        first = self.transformer_blocks[0] if len(self.transformer_blocks) else self.single_transformer_blocks[0]
        mod = first.norm1(temb) if isinstance(first, DoubleStreamBlock) else first.norm(temb)
        return self.ops.modulate(img, mod[0], mod[1])

"""Train the embedded `digits` model: a tiny FLUX.1-architecture text-to-image model.

    python -m diffstage.models.digits.train OUT_DIR

Stages, each with a fixed seed: (1) an AutoencoderKL on the 32x32 digits, with
shift/scaling factors from the latent statistics; (2) frozen random CLIP and T5
text encoders with locally built tokenizers; (3) a FluxTransformer2DModel trained
with the rectified-flow objective FlowMatchEulerDiscreteScheduler samples
(x_t = (1 - s) x0 + s noise, target noise - x0, timestep s), with 10% of prompts
dropped to "" for classifier-free guidance. The result is a standard Diffusers
FluxPipeline directory. About 21 minutes on 2 CPU cores."""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffstage.models.digits import data
from diffstage.models.flux import callbacks as flux
from diffstage.models.flux.tiny import clip_tokenizer, t5_tokenizer, text_encoders

MAX_SEQUENCE_LENGTH = 16  # FLUX has no text mask: inference must use the training length
TOKEN_WORDS = ("a", "the", "of", "handwritten", "digit", "number", "drawing") + data.WORDS


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=data.SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False,  # as in FLUX's VAE
    )


def make_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def train_vae(images: torch.Tensor, steps: int, batch: int, seed: int):
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    x_all = images * 2 - 1
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3)
        x = x_all[torch.randint(len(x_all), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
    # Latents the transformer sees: (z - shift) * scale ~ zero mean, unit variance.
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    return vae, z


def encode_prompts(tokenizer, text_encoder, tokenizer_2, text_encoder_2, prompts):
    """(pooled CLIP [P, D], T5 sequence [P, L, D]) exactly as FluxPipeline computes them."""
    with torch.no_grad():
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        pooled = text_encoder(ids).pooler_output
        ids2 = tokenizer_2(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                           truncation=True, return_tensors="pt").input_ids
        seq = text_encoder_2(ids2)[0]
    return pooled, seq


def token_ids(latent_hw: int) -> tuple[torch.Tensor, torch.Tensor]:
    side = latent_hw // 2
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return img_ids.reshape(-1, 3), torch.zeros(MAX_SEQUENCE_LENGTH, 3)


def train_transformer(latents, labels, pooled, seq, steps: int, batch: int, seed: int, drop: float = 0.1):
    torch.manual_seed(seed)
    model = make_transformer()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n_templates, empty = len(data.TEMPLATES), len(pooled) - 1
    img_ids, txt_ids = token_ids(latents.shape[-1])
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3)
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = flux.pack(latents[idx], None, None)
        prompt_idx = labels[idx] * n_templates + torch.randint(n_templates, (batch,), generator=gen)
        prompt_idx[torch.rand(batch, generator=gen) < drop] = empty
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal, as in SD3/FLUX
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma[:, None, None]
        xt = (1 - s) * x0 + s * noise
        pred = model(hidden_states=xt, timestep=sigma, pooled_projections=pooled[prompt_idx],
                     encoder_hidden_states=seq[prompt_idx], txt_ids=txt_ids, img_ids=img_ids,
                     return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if step % 200 == 0 or step == steps - 1:
            log(f"transformer step {step}/{steps} loss {loss.item():.4f}")
    return ema.eval()


def restore_interrupted_swap(out_dir: Path) -> None:
    """A crash between the two renames below leaves only `<out>.old`: put it back."""
    old = out_dir.with_name(out_dir.name + ".old")
    if old.is_dir() and not out_dir.exists():
        old.rename(out_dir)


def save(out_dir: Path, vae, transformer, tokenizer, text_encoder, tokenizer_2, text_encoder_2) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    # Write next to the target and swap in at the end: an interrupted run never leaves a
    # half-written checkpoint, and the old one survives until the new one is complete.
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    restore_interrupted_swap(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    index = json.loads((tmp / "model_index.json").read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]  # the name real FLUX repos use
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)  # save_pretrained writes 0600
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the embedded digits model (tiny FLUX architecture).")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--transformer-steps", type=int, default=10000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    restore_interrupted_swap(args.out_dir)
    start = time.time()

    images, labels = data.load()
    log(f"data: {len(images)} digits, {tuple(images.shape[1:])}")
    vae, z = train_vae(images, args.vae_steps, args.batch, args.seed)
    cfg = vae.config
    latents = (z - cfg.shift_factor) * cfg.scaling_factor
    log(f"vae done: latents {tuple(z.shape[1:])}, shift {cfg.shift_factor:.4f}, scale {cfg.scaling_factor:.4f}")

    tokenizer, tokenizer_2 = clip_tokenizer(TOKEN_WORDS), t5_tokenizer(TOKEN_WORDS)
    text_encoder, text_encoder_2 = text_encoders(tokenizer, tokenizer_2, args.seed)
    text_encoder.requires_grad_(False)
    text_encoder_2.requires_grad_(False)
    pooled, seq = encode_prompts(tokenizer, text_encoder, tokenizer_2, text_encoder_2, data.all_prompts())

    transformer = train_transformer(latents, labels, pooled, seq, args.transformer_steps, args.batch, args.seed + 1)
    save(args.out_dir, vae, transformer, tokenizer, text_encoder, tokenizer_2, text_encoder_2)
    log(f"saved {args.out_dir} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

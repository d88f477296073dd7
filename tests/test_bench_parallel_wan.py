"""benchmarks/bench_parallel.py's Wan formulas: the video token count, the FLOPs counted from the layer shapes
(against torch's FlopCounterMode on Diffusers' own WanTransformer3DModel) and the bytes a rank sends per step
(against what 2 gloo processes count on a tiny Wan checkpoint)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_parallel import volume_per_step, wan_transformer_flops, wan_video_tokens  # noqa: E402
from test_parallel import launch  # noqa: E402


def test_wan_video_tokens():
    assert wan_video_tokens(256, 256, 17) == 5 * 16 * 16
    assert wan_video_tokens(480, 832, 81) == 21 * 30 * 52 == 32760
    assert wan_video_tokens(720, 1280, 81) == 21 * 45 * 80 == 75600
    assert wan_video_tokens(48, 48, 9) == 3 * 3 * 3  # the odd case of test_parallel_families


def test_wan_flops_equal_flop_counter():
    from diffusers import WanTransformer3DModel
    from machine_limit import call_flops

    dims = dict(hidden=4 * 8, ffn=40, layers=2, text_dim=24, freq_dim=16, in_channels=16, out_channels=16,
                patch=(1, 2, 2))
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=dims["patch"], num_attention_heads=4, attention_head_dim=8,
                                  in_channels=16, out_channels=16, text_dim=24, freq_dim=16, ffn_dim=40,
                                  num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=32).eval()
    latents = torch.randn(2, 16, 3, 8, 12)  # 3 latent frames x 4 x 6 patches = 72 video tokens
    text = torch.randn(2, 7, 24)
    counted = call_flops(lambda: model(latents, torch.tensor([500, 500]), text, return_dict=False))
    assert counted == wan_transformer_flops(batch=2, video_tokens=72, text_tokens=7, **dims)


def test_wan_bytes_sent_equal_formula(tmp_path):
    from diffstage.models.wan.tiny import SIZES, build_tiny_wan

    checkpoint = build_tiny_wan(tmp_path / "ckpt")
    request = dict(prompt="a red fox", negative_prompt="blurry", guidance_scale=4.0, seed=3, num_inference_steps=2,
                   height=32, width=48, num_frames=5, max_sequence_length=15)
    modes = ("ulysses", "ring", "cfg")
    launch(checkpoint, tmp_path, [{"name": m, "model": "wan_t2v", "parallel": {m: 2}, "request": request}
                                  for m in modes])
    video = wan_video_tokens(32, 48, 5)  # 12: an even split
    size = SIZES["tiny"]
    dims = dict(batch=2, tokens=video, out_tokens=video, heads=size["num_attention_heads"],
                head_dim=size["attention_head_dim"], layers=size["num_layers"], out_channels=16 * 2 * 2, nbytes=4)
    for mode in modes:  # 2 steps; CFG batched in one call (B = 2) for ulysses and ring
        sent = json.loads((tmp_path / f"{mode}.json").read_text())["bytes_sent"]
        assert sent == 2 * volume_per_step(mode, 2, **dims), (mode, sent)

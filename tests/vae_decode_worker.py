"""Run by tests/test_vae_decode.py under torchrun (2 processes): patch-parallel decoding, at the function (the tiny
Wan VAE on seeded latents) and through a pipeline (wan_t2v with parallel.cfg=2 and runtime.vae_parallel=true).
Rank 0 saves what it gets; each rank saves the band it decoded."""
import json
import sys

import numpy as np
import torch


def main() -> None:
    from diffusers import AutoencoderKLWan

    from diffstage import build_pipeline
    from diffstage.distributed import current, init_parallel
    from diffstage.patch_decode import decode_across_ranks

    checkpoint, out_dir, case = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    init_parallel({"cfg": 2}, torch.device("cpu"))
    vae = AutoencoderKLWan.from_pretrained(checkpoint, subfolder="vae").eval()
    latents = torch.randn(*case["latent_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frames = decode_across_ranks(lambda z: vae.decode(z, return_dict=False)[0], latents, case["halo"])
    rank = current().rank
    np.save(f"{out_dir}/function-rank{rank}.npy", frames.numpy())
    pipe = build_pipeline("wan_t2v", model_path=checkpoint, overrides=["reuse.enabled=false", "parallel.cfg=2",
                                                                       *case["overrides"]])
    images = pipe(**case["request"]).images  # output_type np
    if rank == 0:
        np.save(f"{out_dir}/pipeline.npy", images)


if __name__ == "__main__":
    main()

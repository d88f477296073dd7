"""Run by tests/test_parallel*.py under torchrun: build a tiny pipeline (FLUX unless the case names a model)
with each parallel layout in turn and save what rank 0 gets (the image as an array, and the bytes this rank sent) and what each rank
reports (step cache counts)."""
import json
import sys

import numpy as np


def main() -> None:
    from diffstage import build_pipeline
    from diffstage.distributed import current
    from diffstage.distributed.sequence import TRAFFIC

    checkpoint, out_dir, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for case in cases:
        overrides = [f"parallel.{mode}={degree}" for mode, degree in case["parallel"].items()]
        overrides += case.get("overrides", [])
        pipe = build_pipeline(case.get("model", "flux"), model_path=checkpoint,
                              overrides=overrides + ["reuse.enabled=false"])
        TRAFFIC["bytes"] = 0
        out = pipe(**case["request"], output_type="np")
        images = out.images
        with open(f"{out_dir}/{case['name']}-rank{current().rank}-reports.json", "w") as f:
            json.dump(out.reports, f)  # each rank's step cache counts: the ranks must agree
        if current().rank == 0:
            np.save(f"{out_dir}/{case['name']}.npy", images)
            with open(f"{out_dir}/{case['name']}.json", "w") as f:
                json.dump({"bytes_sent": TRAFFIC["bytes"]}, f)


if __name__ == "__main__":
    main()

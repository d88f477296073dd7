"""Run by tests/test_parallel_attention.py under torchrun (2 processes): parallel_attention on each rank's
share of queries, keys, values and key mask, gathered and compared on rank 0 with attention over the whole."""
import json
import sys

import torch


def main() -> None:
    from diffstage.attention.backends import reference
    from diffstage.distributed import init_parallel
    from diffstage.distributed.sequence import gather_output, parallel_attention

    out_dir, mode = sys.argv[1], sys.argv[2]
    state = init_parallel({mode: 2}, torch.device("cpu"))
    results = {}
    for name, (n_q, n_k, masked) in {"uneven": (5, 3, None), "cross_lengths": (7, 4, None),
                                     "mask": (6, 7, "some"), "rank_masked": (5, 6, "second_rank"),
                                     "one_rank_has_mask": (5, 6, "first_rank_only")}.items():
        torch.manual_seed(0)
        q, k, v = torch.randn(2, n_q, 4, 8), torch.randn(2, n_k, 4, 8), torch.randn(2, n_k, 4, 8)
        mask = torch.zeros(2, n_k)
        if masked == "some":
            mask[0, 1] = mask[1, 4:] = float("-inf")
        elif masked == "second_rank":  # every key of rank 1 masked in row 0: a ring block with nothing to attend
            mask[0, 3:] = float("-inf")
        elif masked == "first_rank_only":  # rank 1's keys are all attended: its processor passes no mask
            mask[:, 0] = float("-inf")
        mine = torch.tensor_split(mask, 2, dim=1)[state.rank]
        local_mask = None if masked is None or (masked == "first_rank_only" and state.rank == 1) else mine
        share = [torch.tensor_split(t, 2, dim=1)[state.rank] for t in (q, k, v)]
        out = parallel_attention(*share, local_mask, "sdpa", state)
        whole = gather_output(out, 1, state)
        expected = reference(q, k, v, None if masked is None else mask[:, None, None, :])
        results[name] = float((whole - expected).abs().max())
    if state.rank == 0:
        with open(f"{out_dir}/{mode}.json", "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()

"""Multi-process execution: the parallel layout (state) and sequence-parallel attention (sequence)."""
from .sequence import gather_output, parallel_attention, sequence_parallel, shard_inputs
from .state import ParallelState, check_layout, current, init_parallel, is_main_process

__all__ = ["ParallelState", "check_layout", "current", "init_parallel", "is_main_process", "gather_output",
           "parallel_attention", "sequence_parallel", "shard_inputs"]

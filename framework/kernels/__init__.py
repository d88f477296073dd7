"""Ops DiTs spend time on outside matmuls. `reference` holds the plain-PyTorch spec of each;
compiled and Triton implementations (later) are tested against it."""
from .reference import apply_rope, gated_residual, modulate, rms_norm

__all__ = ["apply_rope", "gated_residual", "modulate", "rms_norm"]

"""sdxl: YAML callbacks and a tiny-checkpoint builder."""

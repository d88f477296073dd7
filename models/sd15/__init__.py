"""sd15: YAML callbacks and a tiny-checkpoint builder."""

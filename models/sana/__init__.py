"""sana: YAML callbacks and a tiny-checkpoint builder."""

"""`python -m diffstage ...`: the diffstage command (what torchrun launches: torchrun ... -m diffstage generate)."""
from .cli import main

main()

"""`python -m diffstage.cli ...`: the diffstage command."""
from . import main

main()

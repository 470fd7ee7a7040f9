"""`python -m codistill_trainer` is the `codistill` command."""

from .cli import main

main()

"""`python -m lunatrain …` (and `torchrun -m lunatrain …`) is the same as the `lunatrain` console script."""

from .console import main

main()

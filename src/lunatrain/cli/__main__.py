"""`python -m lunatrain.cli …` is the same as the `lunatrain` console script."""

from . import main

main()

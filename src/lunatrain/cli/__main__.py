"""`python -m lunatrain.cli …` is the same as the `lunatrain` console script (its start-up checks too)."""

from ..console import main

main()

"""``python -m partialize.cli``: the command line (what torchrun launches)."""

from . import main

main()

"""``python -m partialize``: the command line."""

from .cli import main

main()

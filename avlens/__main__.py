"""``python -m avlens`` is the ``avlens`` command."""

from .cli import main

main()

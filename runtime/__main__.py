"""``python -m runtime [hydra overrides]``: see :mod:`runtime.app`."""

from runtime.app import main

main()

"""``python -m sim [hydra overrides]``: see :mod:`sim.app`."""

from sim.app import main

main()

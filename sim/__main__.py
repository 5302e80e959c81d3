"""``moebits sim [hydra overrides]``: see :mod:`sim.app`."""

from moebits.sim.app import main

main()

"""``moebits runtime [hydra overrides]``: see :mod:`runtime.app`."""

from moebits.runtime.app import main

main()

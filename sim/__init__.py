"""moebits sim: the discrete-event model (SimPy) that replays routing traces under a policy.

The simulator keeps time; what is decided (the policy, its actions, the miss rule, records,
summary, the app) is :mod:`moebits.drive`'s, shared with the runtime.

- :mod:`sim.engine`: the replay engine and its timing model (start here);
- :mod:`sim.link`: a PCIe direction as a closed-form FIFO copy stream;
- :mod:`sim.pool`: the HBM slab pool (a :class:`core.slabs.SlabLedger` plus copy times): the
  mechanism the driver hands actions to;
- :mod:`sim.kernels`: the kernel-time model (tables, roofline, non-MoE, host experts);
- :mod:`sim.fastpath`: the vectorized replay of static policies and the one-class shortcut;
- :mod:`sim.config`, :mod:`sim.runner`, :mod:`sim.app`: ``moebits sim``.
"""

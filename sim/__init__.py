"""moebits sim: the discrete-event model (SimPy) that replays routing traces under a policy.

- :mod:`sim.engine`: the replay engine and its timing model (start here);
- :mod:`sim.link`: a PCIe direction as a closed-form FIFO copy stream;
- :mod:`sim.pool`: the HBM slab pool (a :class:`core.slabs.SlabLedger` plus copy times);
- :mod:`sim.kernels`: the kernel-time model (tables, roofline, non-MoE, host experts);
- :mod:`sim.fastpath`: the vectorized replay of static policies;
- :mod:`sim.metrics`, :mod:`sim.report`: per-pass rows, summary, files and figure;
- :mod:`sim.config`, :mod:`sim.workload`, :mod:`sim.runner`, :mod:`sim.app`: ``moebits sim``;
- :mod:`sim.synth`: a small synthetic routing generator for tests and ``workload=synth``.
"""

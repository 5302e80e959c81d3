"""The policy driver: what is decided, once, below both engines.

Between :mod:`moebits.policies` and the two engines (the SimPy simulator, :mod:`moebits.sim`,
and the torch runtime, :mod:`moebits.runtime`). It builds the policy and its context
(:mod:`.context`), consults it at the seam's points and hands its actions to the engine's
mechanism (:mod:`.driver`), applies the miss rule (:mod:`.missrule`), keeps the quality
bookkeeping (:mod:`.quality`), the per-step records and the summary (:mod:`.records`,
:mod:`.report`), the hydra app both command lines share (:mod:`.app`) and what makes their
sweeps trustworthy: outcomes and resume by config hash (:mod:`.outcome`), finished jobs skipped
without composing them (:mod:`.footprint`, :mod:`.sweeper`), the ledger and tally
(:mod:`.ledger`), the progress bar (:mod:`.sweep`). Pure Python and numpy: no simpy, no torch,
no clock; the engines keep time (sim) and tensors (runtime).
"""

"""Benchmark v2 of the simulated device: a larger, randomised, frozen catalogue (docs/benchmark_v2.md).

Selected by ``SimConfig.benchmark = "v2"``; :class:`digiq.sim.phone.SimPhone` dispatches every v2 task id
(``v2/...``) and state key here, so v1 stays bitwise identical.

* :mod:`digiq.sim.v2.tasks`   the frozen catalogue (``TaskV2``, ``catalogue()``), train / val / test
* :mod:`digiq.sim.v2.layout`  ``StateV2``, the per-episode draw (app grid, result order, toggles), widgets
* :mod:`digiq.sim.v2.render`  pillow drawing of a v2 state
* :mod:`digiq.sim.v2.device`  dynamics, judge and exact Q*/V* on a quotient graph
"""

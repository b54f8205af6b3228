"""The simulated Android device: the embedded default data source.

A real small environment, not a mock: pillow-rendered portrait screens (home screen with three shop
apps, Settings and a Browser; shop apps with a search bar, keyboard, results list and product pages with
"add to cart"; a settings app with wifi / bluetooth / airplane-mode toggles), AitW-style goals with
disjoint train / test splits, the AitW action space hit-tested against widget boxes, a 0/1 success judge,
and exact Q*/V* by value iteration over each task's finite state graph.

Modules:

* :mod:`digiq.sim.tasks`     the fixed task catalogue (``Task``, ``catalogue()``)
* :mod:`digiq.sim.layout`    ``State``, widget boxes, hit-testing
* :mod:`digiq.sim.render`    pillow drawing of a state
* :mod:`digiq.sim.rules`    what v1 and v2 share: canonical actions, TYPE / swipe / shop-goal rules, PNG bytes
* :mod:`digiq.sim.phone`    ``SimPhone`` / ``SimConfig``: reset, step, render, state keys, q_star, v_star
* :mod:`digiq.sim.behaviour` ``BehaviourPolicy`` / ``BehaviourConfig``: the noisy AutoUI-like data policy
* :mod:`digiq.sim.v2`        benchmark v2 (``SimConfig.benchmark = "v2"``): train / val / test, randomised
  starts; docs/benchmark_v2.md

Behind the environment interface it is :class:`digiq.envs.sim.SimEnv`; collection and evaluation
(``digiq collect`` / ``digiq evaluate``, alias ``digiq sim collect`` / ``digiq sim rollout``) live in
:mod:`digiq.stages` and :mod:`digiq.envs`.

Quick use::

    from digiq.sim.phone import SimPhone
    phone = SimPhone()
    task = phone.tasks("train")[0]
    s = phone.reset(task)
    s, reward, done = phone.step(s, 'Action Plan: [PRESS_HOME] ; Action Decision: "action_type": '
                                  '"PRESS_HOME", "touch_point": "[-1.0, -1.0]", ...')
    phone.q_star(phone.state_key(s), phone.canonical_actions(s), gamma=0.95)

Measured numbers live in ``scripts/bench_sim.py``.
"""

"""Small tabular MDPs for the theory experiments, and the exact Bellman optimality operator.

A :class:`TabularMDP` is episodic: ``P[s, a, s']`` over the ``S`` live states may sum to less than one,
the missing mass being the probability of *terminating* (moving to an absorbing zero-value state that is not
stored). Rewards are Bernoulli with mean ``R[s, a]`` so sampled transitions are noisy (what makes tabular
Q-learning a stochastic-approximation problem rather than a deterministic one).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TabularMDP:
    """``P``: (S, A, S) transition probabilities among live states (row sum < 1 = termination mass);
    ``R``: (S, A) mean reward (rewards are sampled as Bernoulli(R)); ``depth``: (S,) distance from the start
    in actions along the shortest path (used by the cosine features); ``start``: the start state."""

    P: np.ndarray
    R: np.ndarray
    depth: np.ndarray
    start: int = 0
    names: tuple[str, ...] = ()

    @property
    def n_states(self) -> int:
        return int(self.P.shape[0])

    @property
    def n_actions(self) -> int:
        return int(self.P.shape[1])

    def p_full(self) -> np.ndarray:
        """(S, A, S+1): transition probabilities with the terminal state appended as the last index."""
        term = np.clip(1.0 - self.P.sum(-1, keepdims=True), 0.0, 1.0)
        return np.concatenate([self.P, term], axis=-1)


def branching_mdp(p_stay: float = 0.2) -> TabularMDP:
    """The depth-3 branching MDP of the q-learning / function-approximation experiments (10 (s, a) pairs).

    ``s0`` (depth 0) -> ``s1`` / ``s2`` (depth 1) -> ``s3`` / ``s4`` (depth 2) -> terminal. Every action
    fails to change the screen with probability ``p_stay`` (the agent stays put, reward 0: the Android
    "tap did nothing" case that Digi-Q's Stage-1 label is about), which makes the MDP cyclic so value
    iteration converges geometrically instead of exactly after 3 sweeps. Rewards arrive only on the final
    (terminating) transition, as in AitW's sparse success reward.
    """
    go = 1.0 - p_stay
    S, A = 5, 2
    P = np.zeros((S, A, S))
    R = np.zeros((S, A))
    for s in range(S):  # failure to act: the screen (state) is unchanged
        P[s, :, s] = p_stay
    P[0, 0, 1] = go  # s0 -a0-> s1
    P[0, 1, 2] = go  # s0 -a1-> s2
    P[1, 0, 3] = go  # s1 -a0-> s3
    P[1, 1, 4], P[1, 1, 3] = 0.5 * go, 0.5 * go  # s1 -a1-> s3 or s4 (stochastic)
    P[2, 0, 4] = go  # s2 -a0-> s4
    P[2, 1, 3] = go  # s2 -a1-> s3
    # s3, s4: both actions terminate (probability `go`); success probabilities differ per action.
    R[3] = go * np.array([0.9, 0.2])
    R[4] = go * np.array([0.6, 0.5])
    return TabularMDP(P=P, R=R, depth=np.array([0, 1, 1, 2, 2]), names=("s0", "s1", "s2", "s3", "s4"))


def chain_mdp(depth: int) -> TabularMDP:
    """A deterministic chain of ``depth`` states; action 1 ('forward') moves right, action 0 ('stay')
    leaves the state unchanged; 'forward' from the last state terminates with reward +1."""
    P = np.zeros((depth, 2, depth))
    R = np.zeros((depth, 2))
    for s in range(depth):
        P[s, 0, s] = 1.0
        if s + 1 < depth:
            P[s, 1, s + 1] = 1.0
    R[depth - 1, 1] = 1.0
    return TabularMDP(P=P, R=R, depth=np.arange(depth))


def bellman_optimality(mdp: TabularMDP, Q: np.ndarray, gamma: float) -> np.ndarray:
    """(T Q)(s, a) = R(s, a) + gamma * sum_s' P(s' | s, a) max_a' Q(s', a') (terminal value 0)."""
    return mdp.R + gamma * mdp.P @ Q.max(-1)


def value_iteration(mdp: TabularMDP, gamma: float, iters: int, Q0: np.ndarray | None = None) -> np.ndarray:
    """The iterates ``Q_0, T Q_0, ..., T^iters Q_0`` stacked as (iters + 1, S, A)."""
    Q = np.zeros((mdp.n_states, mdp.n_actions)) if Q0 is None else np.asarray(Q0, dtype=float)
    out = [Q]
    for _ in range(iters):
        Q = bellman_optimality(mdp, Q, gamma)
        out.append(Q)
    return np.stack(out)


def q_star(mdp: TabularMDP, gamma: float, tol: float = 1e-15) -> np.ndarray:
    """Q* by iterating T to a fixed point (a gamma-contraction, so this terminates for gamma < 1); ``tol`` is
    relative to max |Q| so the result is exact to round-off (the value-iteration plot goes down to 1e-15)."""
    Q = np.zeros((mdp.n_states, mdp.n_actions))
    for _ in range(200_000):
        Q_new = bellman_optimality(mdp, Q, gamma)
        if np.abs(Q_new - Q).max() <= tol * max(1.0, np.abs(Q_new).max()):
            return Q_new
        Q = Q_new
    raise RuntimeError("value iteration did not converge (is gamma < 1?)")


def sample_step(
    mdp: TabularMDP, rng: np.random.Generator, s: np.ndarray, a: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample one transition for a batch of runs: returns ``(r, s_next, done)``.

    ``s_next`` is ``S`` (one past the live states) when the episode terminated. The reward is Bernoulli and
    only paid on a terminating transition, with success probability ``R / P(terminate)`` so ``E[r] = R``.
    """
    pf = mdp.p_full()[s, a]  # (B, S+1)
    u = rng.random(s.shape[0])
    s_next = (u[:, None] > np.cumsum(pf, axis=-1)).sum(-1)
    s_next = np.minimum(s_next, mdp.n_states)  # guard against round-off at the top of the cumsum
    done = s_next == mdp.n_states
    term = pf[:, -1]
    p_success = np.divide(mdp.R[s, a], term, out=np.zeros_like(term), where=term > 0)
    r = (done & (rng.random(s.shape[0]) < p_success)).astype(float)
    return r, s_next, done

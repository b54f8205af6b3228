"""Official-format (.pt) AitW files built in the tests: two goals on the same screens, and their imports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digiq.actions import Action, make_observation

GOALS = ("Turn on wifi", 'Go to shopmart.com, search for "usb cable", and select the first entry')


def two_task_file(
    folder: Path, per_goal: int = 6, horizon: int = 3, ds: int = 4, da: int = 6, n: int = 3, seed: int = 0
) -> Path:
    """``per_goal`` trajectories of each goal over the *same* screens and actions (features depend on the
    step only); the first goal succeeds at the last step, the second never does.

    So a critic whose inputs lack the goal sees identical rows for both goals and cannot tell them apart.
    Written as the official post-processed files are (image_path = s_t, next_image_path = s_(t+1), one
    ``q_rep_out_list`` (N, D) array, 1408-d-like ``image_features`` and the next step's ``next_observation``
    / ``next_image_features`` per step).
    """
    rng = np.random.default_rng(seed)
    screens = rng.normal(size=(horizon + 1, ds)).astype(np.float32)
    feats = rng.normal(size=(horizon, n, da)).astype(np.float32)
    shots = folder / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    for t in range(horizon + 1):
        Image.new("RGB", (8, 16), (30 * t % 255, 60, 90)).save(shots / f"screen_{t}.png")
    acts = [Action.tap(0.1 + 0.2 * t, 0.5) for t in range(horizon)]
    data = []
    k = 0
    for g, goal in enumerate(GOALS):
        for _ in range(per_goal):
            traj = []
            for t in range(horizon):
                last = t == horizon - 1
                cands = [acts[t].render()] + [Action.tap(0.9, 0.1 * (i + 1)).render() for i in range(n - 1)]
                if t == 1:  # a TYPE candidate: typed text reaches the text encoder
                    cands[-1] = Action.type_text("usb cable").render()
                traj.append(
                    {
                        "observation": make_observation(goal, acts[t - 1] if t else None),
                        "action": cands[0],
                        "reward": 1 if (last and g == 0) else 0,
                        "done": last,
                        "image_path": f"shots/screen_{t}.png",
                        "next_image_path": f"shots/screen_{t + 1}.png",
                        "task": goal,
                        "action_list": cands,
                        "image_features": screens[t],
                        # s_(t+1) as the official files store it (the trainer reads these for V(s'))
                        "next_observation": make_observation(goal, acts[t]),
                        "next_image_features": screens[t + 1],
                        "q_rep_out_list": feats[t],
                        "q_rep_out": feats[t, 0],
                    }
                )
            data.append(traj)
            k += 1
    # Interleave the goals so that the last (validation) trajectories hold both.
    order = [i for pair in zip(range(per_goal), range(per_goal, 2 * per_goal)) for i in pair]
    path = folder / "two_tasks.pt"
    torch.save([data[i] for i in order], path)
    return path


def import_file(pt: Path, out: Path) -> tuple[Path, Path]:
    """``digiq import`` of ``pt`` with its features: (dataset folder, feature cache folder)."""
    from digiq.data.importer import Config, run

    ds, feats = out / "ds", out / "feats"
    run(Config(inputs=(str(pt),), output=str(ds), features_output=str(feats)))
    return ds, feats


def ensemble_mlp_numpy(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Every twin of an EnsembleMLP (ReLU, no LayerNorm) evaluated with numpy in float64, one twin at a
    time: (B, T). The independent reference the critic hand computations compare against."""
    ws = [w.detach().double().numpy() for w in net.weights]
    bs = [b.detach().double().numpy() for b in net.biases]
    out = []
    for i in range(net.num):
        h = x
        for k, (w, b) in enumerate(zip(ws, bs)):
            h = h @ w[i] + b[i, 0]
            if k < len(ws) - 1:
                h = np.maximum(h, 0.0)
        out.append(h[:, 0])
    return np.stack(out, axis=1)

"""Can a policy read benchmark v2's shuffled home screen? The greedy first action of fresh episodes, scored
against the simulator's exact Q*.

A DIAGNOSTIC, not a method: it reads privileged simulator state (the start state's key, Q*, V*) to score
the policy's action; no stage of the pipeline may use it. Every v2 episode starts on the home screen, a 3 x 3
grid of the nine apps shuffled per episode, so one greedy action per episode tells apart:

- ``optimal``: the first action attains V* (on the home screen: a tap on the goal's app);
- ``on_app``: the tap opened *some* app (the screen changed), right or wrong; ``on_app - optimal`` is the
  share of confident taps on the wrong app (the grid is not read), ``1 - on_app`` the share of taps that
  missed every icon or were not taps (the action format or the geometry is not learnt);
- train versus val goals: reading the grid on train goals but not on val goals is a generalisation gap, not
  a reading failure; low on both with a low BC loss would mean the pixels do not carry the app's identity.

    PYTHONPATH=. python scripts/probe_home_screen.py runs/behaviour_model/bc/policy --episodes 200

``--colour N`` (a pretrained VLM folder) adds the pretraining stream's ``grid_colour`` skill ('Tap the teal
tile' on a grid of 9 distinct named colours): greedy accuracy on N fresh questions, the probability the model
gives the named slot among the nine, and a linear probe per colour of the frozen image tokens (is the
colour's slot in what the language model reads?, always on 9-colour screens). ``--colour-tiles K`` asks
the questions on screens with only K coloured tiles (the rest one neutral fill): also the share of greedy
taps on a coloured tile and the named slot's probability among the K coloured ones (chance 1/K).

Episodes are those of ``digiq evaluate`` at the same seed (``SimEnv.task_instances``), so the first actions
are the ones its greedy rollouts take. Prints one JSON object (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from digiq.actions import make_observation, parse_action
from digiq.envs.sim import TRACE_GAMMA, SimEnv
from digiq.models.policy import build_chat_training_batch, load_policy_fn
from digiq.sim import synthetic as S
from digiq.sim.phone import SimConfig, SimPhone
from digiq.sim.v2.layout import episode, home_slot_box
from digiq.sim.v2.tasks import APPS


def probe(
    policy_fn: Callable[[list[dict]], list[str]],
    splits: tuple[str, ...] = ("train", "val"),
    episodes: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Per split: the share of ``policy_fn``'s first actions that are Q*-optimal (``optimal``) and that open
    an app (``on_app``), over ``episodes`` v2 episodes of ``digiq evaluate``'s seeding, plus the screens the
    wrong apps opened. ``policy_fn`` is a rollout callable (batch dicts -> AutoUI strings)."""
    phone = SimPhone(SimConfig(benchmark="v2"))
    env = SimEnv(phone=phone)
    out: dict[str, Any] = {"seed": seed, "episodes": episodes}
    for split in splits:
        t0 = time.perf_counter()
        rows = []
        for inst in env.task_instances(split, episodes, seed):
            obs = env.reset(inst)
            rows.append(
                {
                    "screenshot": obs.screenshot,
                    "observation": make_observation(obs.goal, None),
                    "task": obs.goal,
                    "state_key": obs.info["state_key"],
                    "state": obs.info["state"],
                }
            )
        actions = policy_fn(rows)
        optimal = on_app = 0
        wrong: dict[str, int] = {}
        for row, text in zip(rows, actions):
            key, state = row["state_key"], row["state"]
            act = parse_action(text)
            q = float(phone.q_star(key, [act], TRACE_GAMMA)[0])
            is_opt = q >= phone.v_star(key, TRACE_GAMMA) - 1e-9
            nxt, _, _ = phone.step(state, act)
            opened = nxt.screen != state.screen
            optimal += is_opt
            on_app += opened
            if opened and not is_opt:
                wrong[nxt.screen] = wrong.get(nxt.screen, 0) + 1
        n = len(rows)
        out[split] = {
            "optimal": optimal / n,
            "on_app": on_app / n,
            "wrong_app_opened": dict(sorted(wrong.items(), key=lambda kv: -kv[1])),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return out


def ground(policy_fn: Callable[[list[dict]], list[str]], episodes: int = 40, seed: int = 0) -> float:
    """Zero-shot grounding of the home grid's labels: for each of ``episodes`` val home screens and each of the
    nine apps, the prompt 'Goal: Tap "<label>"' (the pretraining stream's ground skill, with the label as the
    screen shows it, CamelCase split), scored by whether the tap lands in that app's slot. Chance is 1/9."""
    phone = SimPhone(SimConfig(benchmark="v2"))
    env = SimEnv(phone=phone)
    rows, boxes = [], []
    for inst in env.task_instances("val", episodes, seed):
        obs = env.reset(inst)
        slot = episode(inst.task_id, inst.seed).app_slot
        for a, name in enumerate(APPS):
            label = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
            rows.append(
                {"screenshot": obs.screenshot, "observation": make_observation(f'Tap "{label}"', None)}
            )
            boxes.append(home_slot_box(slot[a]))
    hits = 0
    for text, (y0, x0, y1, x1) in zip(policy_fn(rows), boxes):
        act = parse_action(text)
        hits += act.touch is not None and y0 <= act.touch[0] <= y1 and x0 <= act.touch[1] <= x1
    return hits / len(rows)


def _linear_probe(
    x: torch.Tensor, y: torch.Tensor, n_train: int, n_classes: int, l2: float, steps: int
) -> float:
    """Held-out accuracy of a linear softmax classifier from (normalised) ``x`` to ``y``, fitted on the first
    ``n_train`` rows from zero weights with Adam and an L2 penalty ``l2``."""
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        logits = x[:n_train] @ w + b
        loss = torch.nn.functional.cross_entropy(logits, y[:n_train]) + l2 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean())


def _normalised(x: torch.Tensor, n_train: int) -> torch.Tensor:
    """``x`` standardised with the mean and spread of its first ``n_train`` rows."""
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    return (x - mu) / sd


def fit_slot_probe(x: torch.Tensor, slots: torch.Tensor, n_train: int, steps: int = 300) -> list[float]:
    """Per app, a linear softmax classifier from ``x`` (screens x features) to the app's grid slot, fitted on the
    first ``n_train`` screens; returns the held-out accuracy per app (``slots``: screens x apps)."""
    torch.manual_seed(0)
    x = _normalised(x, n_train)
    return [_linear_probe(x, slots[:, a], n_train, 9, 1e-3, steps) for a in range(slots.shape[1])]


def image_token_probe(folder: str, n_train: int = 1500, n_test: int = 500) -> list[float]:
    """Do the model's frozen image tokens (after the connector, what the language model reads) say where each
    app is? A linear probe per app from a home screen's tokens to that app's slot, trained on ``n_train``
    training-goal screens, scored on ``n_test`` validation-goal screens. Idefics3-family models only."""
    from digiq.models.vlm import load_vlm

    phone = SimPhone(SimConfig(benchmark="v2"))
    env = SimEnv(phone=phone)
    model, processor = load_vlm(folder)
    model.eval()
    insts = env.task_instances("train", n_train, 5) + env.task_instances("val", n_test, 5)
    feats, slots = [], []
    for i in range(0, len(insts), 100):
        chunk = insts[i : i + 100]
        feats.append(image_features(model, processor, [env.reset(x).screenshot for x in chunk]))
        slots += [list(episode(x.task_id, x.seed).app_slot) for x in chunk]
    return fit_slot_probe(torch.cat(feats), torch.tensor(slots), n_train)


def image_features(model: Any, processor: Any, images: list) -> torch.Tensor:
    """What an Idefics3-family language model reads of each screen: its image tokens after the connector,
    flattened (screens x features)."""
    enc = processor.image_processor(images=[[im] for im in images], return_tensors="pt")
    with torch.no_grad():
        f = model.model.get_image_features(
            pixel_values=enc["pixel_values"], pixel_attention_mask=enc["pixel_attention_mask"]
        )
    f = getattr(f, "pooler_output", f)
    f = torch.stack(list(f)) if isinstance(f, (list, tuple)) else f
    return f.reshape(len(images), -1)


def colour_token_probe(
    features: Callable[[list], torch.Tensor], n_train: int = 2000, n_test: int = 500
) -> dict[str, float]:
    """Is "where is the <colour> tile" in the image tokens? On fresh screens of the pretraining stream's
    ``grid_colour`` skill (9 distinct named colours on v2's grid), per palette colour a linear probe
    (:func:`fit_slot_probe`) from ``features(images)`` to that colour's slot, fitted on the first ``n_train``
    screens that hold the colour, scored on the rest. Chance is 1/9."""
    screens = [S.grid_colour_screen(random.Random(f"probe:{k}"), 180, 320) for k in range(n_train + n_test)]
    x = torch.cat([features([s.image for s, _ in screens[i : i + 100]]) for i in range(0, len(screens), 100)])
    out = {}
    for c in sorted(S.GRID_COLOURS):
        idx = [k for k, (_, names) in enumerate(screens) if c in names]
        n_fit = sum(k < n_train for k in idx)
        slots = torch.tensor([[screens[k][1].index(c)] for k in idx])
        out[c] = fit_slot_probe(x[idx], slots, n_fit)[0]
    return out


def token_position_probe(
    features: Callable[[list], torch.Tensor], n_tokens: int, n_train: int = 500, n_test: int = 100
) -> float:
    """Does each image token know where it is? A linear softmax classifier from ONE token's features (a slice
    of ``features(images)``, screens x (n_tokens * d)) to that token's index, fitted on the tokens of
    ``n_train`` fresh ``grid_colour`` screens, scored on ``n_test`` more. Writing ``tap y x`` after attending
    to the right token needs its position in its value, which the slot probes above cannot tell (they see
    every token at its own index). Chance is 1 / n_tokens."""
    screens = [
        S.grid_colour_screen(random.Random(f"pos:{k}"), 180, 320)[0].image for k in range(n_train + n_test)
    ]
    x = torch.cat([features(screens[i : i + 100]) for i in range(0, len(screens), 100)])
    x = x.reshape(len(screens) * n_tokens, -1)
    y = torch.arange(n_tokens).repeat(len(screens))
    fit = n_train * n_tokens
    torch.manual_seed(0)
    return _linear_probe(_normalised(x, fit), y, fit, n_tokens, 1e-4, 300)


def slot_probabilities(model: Any, processor: Any, sample: S.Sample) -> torch.Tensor:
    """The model's distribution over the nine grid slots for a grid question: the likelihood of each answer
    ``tap y x`` at a slot's centre (summed over its tokens), normalised over the nine."""
    answers = [f"tap {S._pt(*S._centre(home_slot_box(i)))}" for i in range(9)]
    batch = build_chat_training_batch(processor, [sample.image] * 9, [sample.question] * 9, answers)
    labels = batch.pop("labels")[:, 1:]
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits[:, :-1].float(), -1)
    keep = labels != -100
    ll = (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep).sum(1)
    return torch.softmax(ll, 0)


def _compact_tap(text: str) -> tuple[float, float] | None:
    """The point of a compact ``tap y x`` answer (as :func:`digiq.sim.synthetic.is_correct` reads it)."""
    parts = text.strip().lower().split()
    try:
        return (float(parts[1]), float(parts[2])) if len(parts) == 3 and parts[0] == "tap" else None
    except ValueError:
        return None


def colour_pointer(
    model: Any, processor: Any, n: int, n_likelihood: int = 96, tiles: int = 9
) -> dict[str, float]:
    """The ``grid_colour`` skill on ``n`` fresh questions (pretrain-vlm's evaluation seed and scoring): greedy
    accuracy, and on the first ``n_likelihood`` the mean probability :func:`slot_probabilities` gives the named
    tile's slot (chance 1/9; it moves before greedy accuracy does). With ``tiles`` < 9 coloured tiles (the
    rest neutral) also: the share of greedy taps on a coloured tile, the probability mass on the coloured
    slots, and the named slot's probability among the coloured ones (chance 1 / tiles)."""
    from digiq.models.policy import generate_texts
    from digiq.stages.pretrain_vlm import evaluation_samples, spec_for

    seed = 20261130
    samples = evaluation_samples(seed, n, 180, 320, skills=["grid_colour"], grid_colour_tiles=tiles)
    # Each question's slot colours: its screen is the first thing its generator draws (checked on the pixels).
    names = []
    for i, s in enumerate(samples):
        screen, slot_names = S.grid_colour_screen(
            random.Random(f"eval:{seed}:grid_colour:{i}"), 180, 320, tiles
        )
        assert screen.image.tobytes() == s.image.tobytes(), i
        names.append(slot_names)
    boxes = [home_slot_box(i) for i in range(9)]
    hits, on_coloured = [], []
    for b in range(0, n, 32):
        chunk = samples[b : b + 32]
        texts = generate_texts(
            model, processor, [s.image for s in chunk], ["" for _ in chunk], spec_for(processor),
            temperature=0.0, user_texts=[s.question for s in chunk],
        )  # fmt: skip
        for k, (s, out) in enumerate(zip(chunk, texts, strict=True)):
            hits.append(S.is_correct(s, out[0]))
            tap = _compact_tap(out[0])
            on_coloured.append(
                tap is not None and any(names[b + k][j] and S.inside(tap, boxes[j]) for j in range(9))
            )
    named, mass, among = [], [], []
    for s, slot_names in zip(samples[:n_likelihood], names):
        p = slot_probabilities(model, processor, s)
        coloured = [j for j in range(9) if slot_names[j]]
        named.append(float(p[boxes.index(s.box)]))
        mass.append(float(p[coloured].sum()))
        among.append(named[-1] / mass[-1])
    res = {"accuracy": sum(hits) / n, "p_named_slot": sum(named) / len(named), "questions": n, "tiles": tiles}
    if tiles < 9:
        res["greedy_on_coloured"] = sum(on_coloured) / n
        res["p_coloured_slots"] = sum(mass) / len(mass)
        res["p_named_among_coloured"] = sum(among) / len(among)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", help="an exported policy folder (e.g. <work_dir>/bc/policy)")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--splits", default="train,val", help="comma-separated (never test: defaults are chosen on val)"
    )
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("--tokens", action="store_true", help="also the linear probe of the frozen image tokens")
    ap.add_argument(
        "--ground", type=int, default=0, help="also zero-shot grounding on this many val home screens"
    )
    ap.add_argument(
        "--colour",
        type=int,
        default=0,
        help="also the grid_colour skill on this many fresh questions and its linear probe of the image tokens",
    )
    ap.add_argument(
        "--colour-tiles",
        type=int,
        default=9,
        help="how many of the grid_colour questions' 9 tiles are coloured (2-9; the rest neutral)",
    )
    ap.add_argument(
        "--positions",
        action="store_true",
        help="also whether each frozen image token, alone, tells its own index (a linear probe)",
    )
    args = ap.parse_args(argv)
    fn = load_policy_fn(args.policy, temperature=0.0, batch_size=32, device="cpu")
    res: dict[str, Any] = {"policy": args.policy}
    if args.episodes:  # --episodes 0: only the probes asked for below
        res.update(probe(fn, tuple(args.splits.split(",")), args.episodes, args.seed))
    if args.tokens:
        acc = image_token_probe(args.policy)
        res["image_tokens"] = {
            "slot_accuracy_per_app": [round(a, 3) for a in acc],
            "mean": sum(acc) / len(acc),
        }
    if args.ground:
        res["ground"] = {"accuracy": ground(fn, args.ground, args.seed), "screens": args.ground}
    if args.colour or args.positions:  # both read the model's own image features: load it once
        from digiq.models.vlm import load_vlm

        model, processor = load_vlm(args.policy)
        model.eval()

        def features(ims: list) -> torch.Tensor:
            return image_features(model, processor, ims)

    if args.colour:
        res["grid_colour"] = colour_pointer(model, processor, args.colour, tiles=args.colour_tiles)
        per = colour_token_probe(features)
        res["grid_colour"]["image_tokens"] = {
            "slot_accuracy_per_colour": {c: round(a, 3) for c, a in per.items()},
            "mean": sum(per.values()) / len(per),
        }
    if args.positions:
        n_tokens = int(getattr(processor, "image_seq_len", 16))
        res["token_positions"] = {
            "accuracy": token_position_probe(features, n_tokens),
            "chance": 1 / n_tokens,
        }
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

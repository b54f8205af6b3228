"""Build the simulated device's behaviour model, our AutoUI analogue, and ship it with its card.

In the paper the offline data is collected by AutoUI, a pixel GUI agent trained on human demonstrations,
and the Best-of-N candidates are sampled from it (Digi-Q paper, arXiv:2502.15760, Sec. 5.1). Here the
simulator's scripted policy is the demonstrator (the people of AutoUI's data): it demonstrates the
*training* goals only, and the shipped GUI-pretrained VLM is behaviour-cloned on those demonstrations.
The result reads only pixels and the prompt; `digiq pipeline` then collects its offline data by sampling it
(`collect.policy`, `collect.temperature`).

    PYTHONPATH=. python scripts/make_behaviour_model.py --config configs/behaviour-model/sim.yaml
    PYTHONPATH=. python scripts/make_behaviour_model.py --config configs/behaviour-model/miniwob.yaml

On MiniWoB++ (`demonstrations.env: miniwob`) the demonstrator is the DOM expert without mistakes on the
demonstration pages (`split: demo`, a page-seed range no collection, validation or test episode uses), the
start is the web-pretrained gui-tiny-web, and the model is evaluated on validation pages (`eval_splits`).

Steps, each into `<work_dir>/<step>`: demonstrations (`digiq collect`, the demonstrator without mistakes,
training goals) -> `digiq train-bc` from `start` -> `digiq evaluate` greedy and sampled at `temperature` on the
training goals and, where the benchmark has them, the validation goals -> the export, `README.md` (the card)
and `behaviour.json` (the record) written atomically to `output`. Its data holds no validation or test goal
(the record lists the demonstrated tasks; a test checks their split).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from digiq.config import load_config, save_config, to_dict
from digiq.data.schema import dataset_info
from digiq.errors import DigiqError
from digiq.models.shipped import GUI_TINY, resolve_model_folder
from digiq.sim.behaviour import BehaviourConfig
from digiq.stages import collect, evaluate, train_bc
from digiq.training.policy_loop import POLICY_DIR
from digiq.utils.io import atomic_write_json, is_complete, mark_complete, staged_dir
from digiq.utils.machine import describe

RECORD = "behaviour.json"
COMMAND = "PYTHONPATH=. python scripts/make_behaviour_model.py --config configs/behaviour-model/sim.yaml"


def _demonstrations() -> collect.Config:
    return collect.Config(
        num_trajectories=400, split="train", behaviour=BehaviourConfig(p_optimal=1.0), seed=1000
    )


def _bc() -> train_bc.Config:
    c = train_bc.Config()
    c.train = dataclasses.replace(c.train, batch_size=32, epochs=6.0, log_every=25)
    c.optim = dataclasses.replace(c.optim, lr=2e-3)
    return c


@dataclasses.dataclass
class Config:
    # The shipped folder (written whole, atomically, at the end).
    output: str = "data/pretrained/gui-tiny-agent"
    # Intermediate steps (demonstrations, train-bc, evaluations); kept so a killed run resumes per step.
    work_dir: str = "runs/behaviour_model"
    # The GUI-pretrained VLM the clone starts from.
    start: str = GUI_TINY
    # 0 = read screens as `start`'s processor does. N > 0 (a multiple of the vision tower's image_size, e.g.
    # 256 for gui-tiny): clone from a copy of `start` whose processor resizes the screen to N x N and splits it
    # into tower-sized tiles plus a global view (digiq.models.screen_tiles): same weights, more image tokens.
    # The setting is saved with the model, so everything fine-tuned from it reads screens the same way.
    tile_longest_edge: int = 0
    # The demonstrations: the scripted demonstrator on training goals (split must stay train).
    demonstrations: collect.Config = dataclasses.field(default_factory=_demonstrations)
    train_bc: train_bc.Config = dataclasses.field(default_factory=_bc)
    # The sampling temperature the pipeline collects with; the card reports success at it and greedy.
    temperature: float = 1.0
    # Episodes per evaluation (per split, greedy and sampled).
    eval_episodes: int = 200
    # The splits evaluated ([] = train and, where the benchmark has them, val: the simulator's goals;
    # MiniWoB++ takes [val], its validation pages).
    eval_splits: list[str] = dataclasses.field(default_factory=list)
    # False: greedy evaluations only (comparing screen-reading settings; sampled episodes of a weak model run
    # to the horizon and cost most of the evaluation time).
    eval_sampled: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.demonstrations.split not in ("train", "demo"):
            raise DigiqError(
                "demonstrations.split must be train (the simulator's training goals) or demo (MiniWoB++'s "
                "demonstration pages): the behaviour model never sees validation or test goals"
            )
        if self.temperature <= 0:
            raise DigiqError("temperature must be > 0 (the model collects by sampling)")
        if self.tile_longest_edge < 0:
            raise DigiqError(f"tile_longest_edge must be >= 0 (0 = no tiles), got {self.tile_longest_edge}")
        self.demonstrations.validate()
        self.train_bc.validate()


def _splits(cfg: Config) -> list[str]:
    if cfg.eval_splits:
        return list(cfg.eval_splits)
    from digiq.sim.phone import SimPhone

    phone = SimPhone(cfg.demonstrations.sim)
    out = ["train"]
    try:
        phone.tasks("val")
        out.append("val")
    except DigiqError:
        pass
    return out


def start_folder(cfg: Config, work: Path) -> tuple[str, int]:
    """The folder the clone starts from and the image tokens of one screen under its processor: ``start``
    itself, or (``tile_longest_edge`` > 0) its copy ``<work_dir>/start`` whose processor tiles the screen."""
    from digiq.models.screen_tiles import image_tokens, tile_screens
    from digiq.models.vlm import load_vlm

    src = resolve_model_folder(cfg.start)
    if not cfg.tile_longest_edge:
        return src, image_tokens(load_vlm(src)[1])
    return str(work / "start"), tile_screens(src, work / "start", cfg.tile_longest_edge)


def run(cfg: Config, command: str = COMMAND) -> dict:
    cfg.validate()
    t0 = time.perf_counter()
    machine = describe()  # measured first: the stage times are read against this rate
    work = Path(cfg.work_dir)
    demos = work / "demonstrations"
    if not is_complete(demos):
        collect.run(dataclasses.replace(cfg.demonstrations, output_dir=str(demos), overwrite=True))
    t_demo = time.perf_counter() - t0
    bc_dir = work / "bc"
    start, tokens = start_folder(cfg, work)
    if not is_complete(bc_dir / POLICY_DIR):
        bc = dataclasses.replace(
            cfg.train_bc,
            dataset=str(demos),
            output_dir=str(bc_dir),
            seed=cfg.seed,
            overwrite=True,
            model=dataclasses.replace(cfg.train_bc.model, name_or_path=start),
        )
        bc_metrics = train_bc.run(bc)
    else:
        bc_metrics = json.loads((bc_dir / "metrics.json").read_text())
    t_bc = time.perf_counter() - t0 - t_demo
    policy = str(bc_dir / POLICY_DIR)
    results: dict[str, dict] = {}
    for split in _splits(cfg):
        decodings = (("greedy", 0.0), ("sampled", cfg.temperature))
        for name, temp in decodings if cfg.eval_sampled else decodings[:1]:
            folder = work / f"eval_{split}_{name}"
            if (folder / "metrics.json").exists():
                m = json.loads((folder / "metrics.json").read_text())
            else:
                m = evaluate.run(
                    evaluate.Config(
                        policy=policy,
                        split=split,
                        num_episodes=cfg.eval_episodes,
                        temperature=temp,
                        seed=cfg.seed,
                        output_dir=str(folder),
                        sim=cfg.demonstrations.sim,
                        env=cfg.demonstrations.env,
                        miniwob=cfg.demonstrations.miniwob,
                        num_workers=cfg.demonstrations.num_workers,
                    )
                )
            results[f"{split}/{name}"] = {
                k: m[k] for k in ("success_rate", "ci_low", "ci_high", "num_episodes")
            }
    info = dataset_info(demos)
    record = {
        "command": command,
        "config": to_dict(cfg),
        "demonstrations": {
            "trajectories": info["num_trajectories"],
            "steps": info["num_steps"],
            "demonstrator_success": info["success_rate"],
            "tasks": sorted(info["per_task_success"]),
        },
        "image_tokens": tokens,
        "train_bc": {k: v for k, v in bc_metrics.items() if isinstance(v, (int, float))},
        "success": results,
        "seconds": {"demonstrations": t_demo, "train_bc": t_bc, "total": time.perf_counter() - t0},
        "machine": machine,
    }
    out = Path(cfg.output)
    with staged_dir(out, overwrite=True) as tmp:
        shutil.copytree(policy, tmp, dirs_exist_ok=True)
        (tmp / "_COMPLETE").unlink(missing_ok=True)
        atomic_write_json(tmp / RECORD, record)
        (tmp / "README.md").write_text(card(record))
        mark_complete(tmp)
    save_config(cfg, work)
    print(card(record))
    return record


def _success_rows(record: dict) -> str:
    """The card's success table rows: split, decoding, rate [95% interval], episodes."""
    return "\n".join(
        f"| {key.split('/')[0]} | {key.split('/')[1]} | {v['success_rate']:.3f} "
        f"[{v['ci_low']:.3f}, {v['ci_high']:.3f}] | {v['num_episodes']} |"
        for key, v in record["success"].items()
    )


def _made_with(record: dict) -> str:
    """The card's lines after the demonstrations line: screen reading, cloning, wall time, machine."""
    c, secs, m = record["config"], record["seconds"], record["machine"]
    bc_train, bc_lr = c["train_bc"]["train"], c["train_bc"]["optim"]["lr"]
    return f"""- screen reading: {record["image_tokens"]} image tokens per screen (tile_longest_edge {c["tile_longest_edge"]}; 0 = the start's processor)
- behaviour cloning: seed {c["seed"]}; batch {bc_train["batch_size"]}, {bc_train["epochs"]} epochs, lr {bc_lr}
- wall time: {secs["total"]:.0f} s in all ({secs["demonstrations"]:.0f} s demonstrations, {secs["train_bc"]:.0f} s behaviour cloning)
- machine: {m.get("cpu", "?")}, {m.get("cores", "?")} cores, measured matmul rate {m["matmul_gflops"]:.1f} GFLOP/s"""


def card(record: dict) -> str:
    c, d = record["config"], record["demonstrations"]
    if c["demonstrations"].get("env") == "miniwob":
        return web_card(record)
    demo_p = c["demonstrations"]["behaviour"]["p_optimal"]
    rows = _success_rows(record)
    return f"""# gui-tiny-agent: the simulated device's behaviour model (our AutoUI analogue)

`{c["start"]}` behaviour-cloned on demonstrations of the simulated device's **training** goals. It reads
the screenshot and the prompt only (no simulator state). `digiq pipeline` collects its offline data by
sampling it at temperature {c["temperature"]} (`collect.policy`, `collect.temperature`), as the paper's data
was collected by AutoUI. It never saw a validation or test goal: the demonstrations cover {len(d["tasks"])}
training tasks (listed in `{RECORD}`).

## How it was made

- command: `{record["command"]}`
- demonstrations: {d["trajectories"]} trajectories, {d["steps"]} steps, by the scripted demonstrator (p_optimal {demo_p}, seed {c["demonstrations"]["seed"]}; its success {d["demonstrator_success"]:.3f})
{_made_with(record)}

## Success on the simulated device (95% Wilson intervals over episodes)

| goals | decoding | success | episodes |
|---|---|---|---|
{rows}

`tests/test_shipped_model.py` checks this card against `{RECORD}` and re-measures greedy success.
"""


def web_card(record: dict) -> str:
    """The card of a MiniWoB++ behaviour model (``demonstrations.env: miniwob``)."""
    c, d = record["config"], record["demonstrations"]
    demo = c["demonstrations"]
    rows = _success_rows(record)
    return f"""# {Path(c["output"]).name}: the MiniWoB++ behaviour model (our web AutoUI analogue)

`{c["start"]}` behaviour-cloned on the DOM expert's demonstrations of {len(d["tasks"])} MiniWoB++ tasks, on
the **demonstration** pages (`split=demo`: page seeds that no collection, validation or test episode uses).
It reads the screenshot and the prompt only (no DOM). `digiq pipeline --config configs/pipeline/miniwob-paper.yaml`
collects its offline data by sampling it at temperature {c["temperature"]} (`collect.policy`,
`collect.temperature`), as the paper's data was collected by AutoUI (Digi-Q paper, Sec. 5.1).

## How it was made

- command: `{record["command"]}`
- demonstrations: {d["trajectories"]} episodes, {d["steps"]} steps, by the DOM expert (p_optimal {demo["miniwob_behaviour"]["p_optimal"]}, seed {demo["seed"]}; its success {d["demonstrator_success"]:.3f}); tasks listed in `{RECORD}`
{_made_with(record)}

## Success on MiniWoB++ (95% Wilson intervals over episodes)

| pages | decoding | success | episodes |
|---|---|---|---|
{rows}
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a YAML file (configs/behaviour-model/sim.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. demonstrations.num_trajectories=200")
    args = ap.parse_args(argv)
    cfg = load_config(Config, args.config, args.overrides)
    try:
        run(
            cfg,
            f"PYTHONPATH=. python scripts/make_behaviour_model.py --config {args.config}"
            if args.config
            else COMMAND,
        )
    except DigiqError as e:
        sys.exit(f"make_behaviour_model: {e}")


if __name__ == "__main__":
    main()

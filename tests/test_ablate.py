"""scripts/ablate.py without training: which weights each arm starts from, which policy each reference row
evaluates, and over which units the intervals are (the stages and evaluations are stubbed; the real run on a
tiny pipeline is tests/test_pipeline.py's slow test)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml
from script_helpers import load_script

from digiq.models.shipped import resolve_model_folder
from digiq.stages import pipeline
from digiq.utils.io import mark_complete

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs/pipeline/miniwob-paper.yaml"  # a model collects (collect.policy) at temperature 1.0
SCRIPTED = ROOT / "configs/pipeline/miniwob.yaml"  # the scripted DOM policy collects


@pytest.fixture(scope="module")
def ablate():
    return load_script("ablate")


def _rows() -> list[dict]:
    """Two seeds of two arms, two tasks each: per-task [successes, episodes] as evaluate reports them."""
    pi = [{"a": [3, 10], "b": [0, 10]}, {"a": [5, 10], "b": [1, 10]}]
    td = [{"a": [6, 10], "b": [2, 10]}, {"a": [7, 10], "b": [3, 10]}]
    rows = []
    for arm, n, per in (("pi_beta", 0, pi), ("td", 16, td)):
        for seed, per_task in enumerate(per):
            k = sum(v[0] for v in per_task.values())
            rows.append(
                {"seed": seed, "arm": arm, "n": n, "success_rate": k / 20, "per_task": per_task}
                | {"method": {"pi_beta": "pi_beta (BC)", "td": "Digi-Q TD"}[arm]}
            )
    return rows


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_pages_are_the_units_on_miniwob_goals_on_the_simulator(ablate) -> None:
    """MiniWoB++ gives every episode its own page: 95% Wilson over the 40 episodes of pi_beta's two seeds
    (9 successes). The simulator clusters over its 4 (seed, goal) units instead."""
    assert ablate.episode_unit("miniwob") == "page" and ablate.episode_unit("sim") == "goal"
    pi = [r for r in _rows() if r["arm"] == "pi_beta"]
    rate, lo, hi, units = ablate.pooled(pi, "page")
    want_lo, want_hi = _wilson(9, 40)  # 0.225: [0.123, 0.375]
    assert (rate, units) == (9 / 40, 40)
    assert lo == pytest.approx(want_lo, abs=1e-12) and hi == pytest.approx(want_hi, abs=1e-12)
    rate_g, lo_g, hi_g, units_g = ablate.pooled(pi, "goal")
    assert units_g == 4 and rate_g == pytest.approx((0.3 + 0.0 + 0.5 + 0.1) / 4)
    assert hi_g - lo_g > hi - lo  # 4 units say less than 40 independent pages

    md = ablate.table(_rows(), "page")
    assert "| method | N | success over episodes (unit = page) [95% CI] | episodes |" in md
    assert f"| pi_beta (BC) | - | 0.225 [{want_lo:.3f}, {want_hi:.3f}] | 40 |" in md
    assert "success over (seed, goal) units [95% CI] | units |" in ablate.table(_rows(), "goal")
    head = ablate.header("val", [0, 1], 20, "page", "behaviour", "agent", 0.1)
    assert "95% Wilson over episodes (unit = page" in head and "`agent` (actor_from=behaviour)" in head


def test_per_task_table_sums_the_seeds(ablate) -> None:
    lines = ablate.per_task_table(_rows()).splitlines()
    assert lines[0] == "| task | pi_beta (BC) | Digi-Q TD, N=16 |"
    assert lines[2:] == ["| a | 8/20 | 13/20 |", "| b | 1/20 | 5/20 |", "| **all** | 9/40 | 18/40 |"]


def _fake_pipeline(tmp_path: Path) -> Path:
    pipe = tmp_path / "p"
    for stage in ("candidates", "cache_features", "train_bc"):
        folder = pipe / pipeline.FOLDERS[stage]
        folder.mkdir(parents=True)
        mark_complete(folder)
    return pipe


def _stub(ablate, monkeypatch) -> tuple[list, dict]:
    """Record the stage configs and evaluations instead of running them; every policy succeeds on task a
    of seed-many episodes."""
    runs: list = []
    evals: dict = {}

    def run_once(stage, base, folder, product, **fields):
        cfg = dataclasses.replace(base, output_dir=str(folder), overwrite=True, **fields)
        runs.append((stage.__name__.rsplit(".", 1)[-1], folder.name, cfg))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text("{}")
        return folder

    def evaluate(policy, out, seed, episodes, base, split, temperature=None):
        evals[out.name] = {"policy": policy, "temperature": temperature, "env": base.env, "split": split}
        return {
            "success_rate": 0.5,
            "split": split,
            "num_episodes": 4,
            "per_task": {"a": [2, 2], "b": [0, 2]},
        }

    monkeypatch.setattr(ablate, "_run_once", run_once)
    monkeypatch.setattr(ablate, "_evaluate", evaluate)
    return runs, evals


def test_actor_from_behaviour_starts_filtered_bc_and_every_extraction_there(
    ablate, tmp_path: Path, monkeypatch
) -> None:
    """The paper's protocol: Filtered BC and Digi-Q both fine-tune the model that collected the data; pi_beta
    stays a row of its own; the behaviour model is evaluated greedy and at collect.temperature."""
    runs, evals = _stub(ablate, monkeypatch)
    pipe, out = _fake_pipeline(tmp_path), tmp_path / "a"
    argv = ["--pipeline", str(pipe), "--config", str(PAPER), "--out", str(out), "--seeds", "0", "--ns", "16"]
    argv += ["--episodes", "4", "--actor-from", "behaviour", "--threshold", "0.2", "--arms"]
    ablate.main([*argv, "behaviour_greedy", "behaviour_sampled", "pi_beta", "filtered_bc", "td", "mc"])
    agent = resolve_model_folder("data/pretrained/gui-tiny-web-agent")
    assert evals["eval_behaviour_greedy"] == {
        "policy": agent,
        "temperature": 0.0,
        "env": "miniwob",
        "split": "val",
    }
    assert evals["eval_behaviour_sampled"]["policy"] == agent
    assert evals["eval_behaviour_sampled"]["temperature"] == 1.0  # collect.temperature of miniwob-paper.yaml
    assert evals["eval_bc"]["policy"] == str(pipe / "bc" / "policy")
    stages = {folder: (stage, cfg) for stage, folder, cfg in runs}
    stage, fbc = stages["filtered_bc"]
    assert stage == "train_bc" and fbc.trajectories == "successful" and fbc.model.name_or_path == agent
    for arm in ("td", "mc"):
        stage, ex = stages[f"extract_{arm}_n16"]
        assert stage == "extract_policy" and ex.init_policy == agent and ex.threshold == 0.2
        assert ex.critic_dir == str(out / f"s0/critic_{arm}/critic") and ex.num_candidates == 16
    rows = json.loads((out / "ablation.json").read_text())
    assert [(r["arm"], r["n"]) for r in rows] == [
        ("behaviour_greedy", 0),
        ("behaviour_sampled", 0),
        ("pi_beta", 0),
        ("filtered_bc", 0),
        ("td", 16),
        ("mc", 16),
    ]
    md = (out / "ablation.md").read_text()
    assert (
        "Split: **val** pages" in md and f"`{agent}` (actor_from=behaviour); extraction threshold 0.2" in md
    )
    assert "| [reference] behaviour model, greedy | - | 0.500 [" in md and "| **all** | 2/4 | 2/4 |" in md

    # The same --out with another actor start would mix two setups: refused before anything runs.
    n_runs = len(runs)
    with pytest.raises(SystemExit, match="another setup .*actor_start"):
        ablate.main([*argv[:-5], "--arms", "td"])
    assert len(runs) == n_runs


def test_the_default_actor_start_is_the_pipeline_configs(ablate, tmp_path: Path, monkeypatch) -> None:
    runs, _ = _stub(ablate, monkeypatch)
    pipe = _fake_pipeline(tmp_path)
    argv = ["--pipeline", str(pipe), "--config", str(PAPER), "--out", str(tmp_path / "a"), "--seeds", "0"]
    ablate.main([*argv, "--ns", "4", "--episodes", "4", "--arms", "filtered_bc", "td"])
    pi_beta = str(pipe / "bc" / "policy")  # miniwob-paper.yaml's actor_from is pi_beta
    recipe = yaml.safe_load(PAPER.read_text())
    stages = {folder: cfg for _, folder, cfg in runs}
    assert stages["filtered_bc"].model.name_or_path == pi_beta
    assert stages["extract_td_n4"].init_policy == pi_beta
    assert stages["extract_td_n4"].threshold == recipe["extract_policy"]["threshold"]


def test_arms_a_scripted_collection_cannot_have_are_refused(ablate, tmp_path: Path, monkeypatch) -> None:
    _stub(ablate, monkeypatch)
    pipe = _fake_pipeline(tmp_path)
    argv = ["--pipeline", str(pipe), "--config", str(SCRIPTED), "--out", str(tmp_path / "a")]
    with pytest.raises(SystemExit, match=r"behaviour_greedy \(collect.policy is the scripted policy"):
        ablate.main([*argv, "--arms", "pi_beta", "behaviour_greedy"])
    with pytest.raises(SystemExit, match="q_star .*no exact Q"):
        ablate.main([*argv, "--arms", "q_star"])
    with pytest.raises(SystemExit, match="actor_from=behaviour .*set collect.policy to a policy folder"):
        ablate.main([*argv, "--actor-from", "behaviour"])
    assert not (tmp_path / "a").exists()
    # by default they are left out, not refused
    from digiq.config import load_config

    pcfg = load_config(pipeline.Config, SCRIPTED, [f"output_dir={pipe}"])
    assert ablate.select_arms(None, pcfg, False) == [
        "pi_beta",
        "filtered_bc",
        "td",
        "mc",
        "td_paper",
        "mc_paper",
    ]


def test_a_finished_arm_of_another_start_is_not_reused(ablate, tmp_path: Path) -> None:
    """_run_once reuses a finished folder only when it started from the same weights and threshold."""
    from digiq.config import save_config
    from digiq.stages import extract_policy

    class Stage:
        runs = 0

        @staticmethod
        def run(cfg) -> None:
            Stage.runs += 1
            save_config(cfg, cfg.output_dir)
            mark_complete(Path(cfg.output_dir) / "policy")

    base = extract_policy.Config(dataset="d", init_policy="runs/p/bc/policy")
    folder = tmp_path / "extract_td_n4"
    ablate._run_once(Stage, base, folder, "policy", threshold=0.1)
    ablate._run_once(Stage, base, folder, "policy", threshold=0.1)
    assert Stage.runs == 1
    with pytest.raises(SystemExit, match="init_policy 'runs/p/bc/policy' there, 'agent' now"):
        ablate._run_once(
            Stage, dataclasses.replace(base, init_policy="agent"), folder, "policy", threshold=0.1
        )
    with pytest.raises(SystemExit, match="threshold 0.1 there, 0.2 now"):
        ablate._run_once(Stage, base, folder, "policy", threshold=0.2)

"""The shared training toolkit: schedule, checkpoint layout, output-folder rule, metrics truncation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import get_scheduler

from digiq.errors import DataError, DigiqError
from digiq.training.checkpoint import (
    finished_checkpoints,
    gather_weights,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from digiq.training.data_order import epoch_order
from digiq.training.output import begin_output, check_output, finish_output
from digiq.training.schedule import make_scheduler, warmup_steps
from digiq.utils.io import is_complete
from digiq.utils.logging import MetricsLogger, read_metrics


def _rates(kind: str, total: int, ratio: float) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = make_scheduler(opt, kind, total, ratio)
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_matches_transformers_one_step_earlier(kind: str) -> None:
    """Our rate at step t is transformers' rate at step t + 1 during warm-up, and equal after it."""
    total, ratio = 40, 0.2
    warm = warmup_steps(ratio, total)
    assert warm == 8
    ours = _rates(kind, total, ratio)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    name = "constant_with_warmup" if kind == "constant" else kind
    hf = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=total)
    theirs = []
    for _ in range(total + 1):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    assert theirs[0] == 0.0  # why we do not use it: its first step changes nothing
    for t in range(total):
        want = theirs[t + 1] if t < warm else theirs[t]
        assert ours[t] == pytest.approx(want, abs=1e-12), (kind, t)
    assert ours[0] == pytest.approx(0.5 / warm)


def test_schedule_by_hand() -> None:
    cos = _rates("cosine", 10, 0.0)
    assert cos[0] == 0.5 and cos[5] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = _rates("linear", 10, 0.3)
    assert lin[:3] == pytest.approx([0.5 / 3, 1.0 / 3, 0.5]) and lin[3] == pytest.approx(0.5)
    assert lin[-1] == pytest.approx(0.5 * (1 - 6 / 7))
    assert _rates("constant", 5, 0.0) == [0.5] * 5
    with pytest.raises(ValueError, match="unknown schedule"):
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "step", 5, 0.0)


def test_epoch_order_is_a_pure_permutation() -> None:
    a, b, c = epoch_order(50, 3, 0), epoch_order(50, 3, 0), epoch_order(50, 3, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a.tolist()) == list(range(50))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 1)
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.tensor([2.0]))


def _train(net: _Net, opt: torch.optim.Optimizer, sched, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 3)
        loss = (net.head(net.frozen(x)) * net.scale).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def test_checkpoint_round_trip_resumes_bitwise(tmp_path: Path) -> None:
    """Save after 3 of 6 steps, restore into fresh objects, finish: equal to 6 straight steps, bit for bit."""

    def fresh() -> tuple[_Net, torch.optim.Optimizer, object]:
        torch.manual_seed(0)
        net = _Net()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        return net, opt, make_scheduler(opt, "cosine", 6, 0.2)

    torch.manual_seed(1)
    net, opt, sched = fresh()
    torch.manual_seed(1)
    straight = _train(net, opt, sched, 6)

    net2, opt2, sched2 = fresh()
    torch.manual_seed(1)
    first = _train(net2, opt2, sched2, 3)
    save_checkpoint(
        tmp_path, 3, net2, opt2, sched2, position={"epoch": 0, "batch": 3}, extra={"k": 1},
        others={"frozen": net2.frozen},
    )  # fmt: skip
    saved = load_checkpoint(latest_checkpoint(tmp_path))
    assert set(saved.weights()) == {"head.weight", "head.bias"}  # frozen parameters are not "trainable"
    assert set(saved.weights("frozen")) == {"weight", "bias"}  # others are saved whole
    assert set(gather_weights(net2, trainable_only=False)) == {"frozen.weight", "frozen.bias", "head.weight",
                                                               "head.bias", "scale"}  # fmt: skip

    net3, opt3, sched3 = fresh()
    torch.manual_seed(123)  # whatever ran in between: restore_rng brings the stream back
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert (ck.step, ck.position, ck.extra) == (3, {"epoch": 0, "batch": 3}, {"k": 1})
    assert ck.restore_training(net3, opt3, sched3) == 3
    assert opt3.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    rest = _train(net3, opt3, sched3, 3)
    assert first + rest == straight
    for (n, p), q in zip(net.named_parameters(), net3.parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_prune_and_refusals(tmp_path: Path) -> None:
    net = _Net()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, net, keep=2)
    assert [p.name for p in finished_checkpoints(tmp_path)] == ["step-3", "step-4"]
    (tmp_path / "checkpoints" / "step-9").mkdir()  # half-written (no marker): never taken
    assert latest_checkpoint(tmp_path).name == "step-4"
    with pytest.raises(DataError, match="no finished checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "step-9")
    other = torch.nn.Linear(3, 1)  # parameter names the checkpoint does not hold
    with pytest.raises(DataError, match="lacks 2 trainable parameter"):
        load_checkpoint(latest_checkpoint(tmp_path)).restore_weights(other)


def test_output_rule(tmp_path: Path) -> None:
    out = tmp_path / "run"
    plan = check_output(out, resume=False, overwrite=False, what="x")
    assert plan.action == "fresh" and plan.resume_from is None  # fresh: nothing there
    begin_output(plan)
    save_checkpoint(out, 5, _Net())
    (out / "metrics.jsonl").write_text('{"step": 5}\n')
    with pytest.raises(FileExistsError, match="unfinished x run; pass --resume"):
        check_output(out, resume=False, overwrite=False, what="x")
    finish_output(out)
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    with pytest.raises(FileExistsError, match="finished x run; pass overwrite=true"):
        check_output(out, resume=False, overwrite=False, what="x")
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    with pytest.raises(DigiqError, match="cannot both"):
        check_output(out, resume=True, overwrite=True, what="x")
    # --resume continues from the newest checkpoint and takes the marker away until the run finishes again
    plan = check_output(out, resume=True, overwrite=False, what="x")
    assert plan.resume_from.name == "step-5"
    assert is_complete(out)  # check_output itself changes nothing
    begin_output(plan)
    assert not is_complete(out) and (out / "metrics.jsonl").exists()
    # overwrite starts over in an empty folder (the old run is kept aside until the new one finishes)
    plan = check_output(out, resume=False, overwrite=True, what="x")
    assert plan.action == "overwrite" and plan.resume_from is None
    begin_output(plan)
    assert [p.name for p in out.iterdir()] == ["digiq_run.json"]


def test_metrics_logger_drops_lines_after_the_resumed_checkpoint(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path, None)
    for step in (1, 2, 3, 4):
        log.log({"train/loss": float(step)}, step)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/lo')  # torn by a kill
    MetricsLogger(tmp_path, None, resume_step=2).log({"train/loss": 30.0}, 3)
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    MetricsLogger(tmp_path, None)  # a new run starts a new file
    assert read_metrics(tmp_path) == []

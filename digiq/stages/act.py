"""``digiq act``: load an exported policy and print the action for one screenshot + goal (JSON).

    digiq act policy=runs/extract/policy image=screen.png goal="Turn on wifi"
    digiq act policy=runs/bc/policy image=screen.png goal="..." previous_action='"action_type": "PRESS_HOME", ...'

Greedy unless the export's ``digiq_policy.json`` asks for sampling (or ``temperature`` > 0 is given).
The printed JSON holds the AutoUI string (``action``), its parsed fields and the raw generated text.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Literal

from digiq.actions import Action, make_observation, parse_action
from digiq.config import check
from digiq.errors import DigiqError
from digiq.models.policy import generate_texts, load_policy, parse_policy_output


@dataclasses.dataclass
class Config:
    # An exported policy folder (digiq train-bc / extract-policy write <output_dir>/policy).
    policy: str = ""
    # Screenshot file (PNG / JPEG).
    image: str = ""
    # The task in natural language.
    goal: str = ""
    # The previous action as an AutoUI string ('' = none: the first step).
    previous_action: str = ""
    # None = the export's setting; 0 = greedy; > 0 = sample at this temperature.
    temperature: float | None = None
    seed: int = 0
    # Where the policy runs ('auto' = a GPU when visible) and its weights' dtype ('auto' = bfloat16 on a
    # GPU, float32 on the CPU).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def validate(self) -> None:
        check(bool(self.policy), "policy must be set (an exported policy folder)")
        check(bool(self.image), "image must be set (a screenshot file)")
        check(bool(self.goal), "goal must be set")


def action_json(action: Action, raw: str) -> dict[str, Any]:
    return {
        "action": action.render() if action.is_valid else raw,
        "action_type": action.type.value,
        "touch_point": list(action.touch) if action.touch else None,
        "lift_point": list(action.lift) if action.lift else None,
        "typed_text": action.text,
        "valid": action.is_valid,
        "raw": raw,
    }


def act(
    model: Any,
    processor: Any,
    spec: Any,
    image: Any,
    goal: str,
    previous_action: str = "",
    temperature: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One action for one screen (the function behind the CLI, usable in-process)."""

    prev = parse_action(previous_action) if previous_action.strip() else None
    observation = make_observation(goal, prev)
    raw = generate_texts(model, processor, [image], [observation], spec, 1, temperature, None, seed)[0][0]
    return action_json(parse_policy_output(raw, spec.action_format), raw)


def run(cfg: Config) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    path = Path(cfg.image)
    if not path.is_file():
        raise DigiqError(f"image not found: {path}")
    try:
        image = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DigiqError(f"{path}: not a readable image: {e}") from e
    model, processor, spec = load_policy(cfg.policy, cfg.device, cfg.dtype)
    result = act(model, processor, spec, image, cfg.goal, cfg.previous_action, cfg.temperature, cfg.seed)
    sys.stdout.write(json.dumps(result) + "\n")
    return result

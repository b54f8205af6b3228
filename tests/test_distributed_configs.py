"""Every accelerate config in configs/accelerate/ parses with accelerate's own loader and is consistent."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_there_is_a_multi_node_config() -> None:
    assert any(load_config_from_file(str(f)).num_machines > 1 for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_accelerate_config_parses(path: Path) -> None:
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1
    assert cfg.num_processes % cfg.num_machines == 0, "num_processes is the total over all machines"
    assert 0 <= cfg.machine_rank < cfg.num_machines
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port, "multi-node needs the main machine's address"
    # digiq configures precision itself (make_accelerator / the stage configs); the launcher must not add one
    # that a stage's config does not ask for, except FSDP 7B where bf16 is the point.
    assert str(cfg.mixed_precision) in ("no", "bf16")

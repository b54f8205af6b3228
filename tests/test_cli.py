from __future__ import annotations

from digiq.cli import main


def test_usage_and_unknown(capsys) -> None:
    assert main([]) == 0
    assert "train-critic" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2

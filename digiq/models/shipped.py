"""Models shipped in the repository's ``data/`` folder, and how a config names them.

``data/pretrained/gui-tiny`` is the tiny VLM pretrained on synthetic GUI screens by ``digiq pretrain-vlm``
(its model card says how); ``data/pretrained/gui-tiny-web`` is it pretrained further on MiniWoB++ web pages;
``data/pretrained/gui-tiny-web-agent`` is that one behaviour-cloned on MiniWoB++ demonstrations. A config
names one by its repository-relative path; :func:`resolve_model_folder` finds it from any working directory
of an editable install and says how to rebuild it when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from digiq.errors import DigiqError

REPO_ROOT = Path(__file__).resolve().parents[2]
GUI_TINY = "data/pretrained/gui-tiny"
# gui-tiny pretrained further on web pages of MiniWoB++ tasks outside the pipeline's list: env=miniwob's start.
GUI_TINY_WEB = "data/pretrained/gui-tiny-web"
# gui-tiny-web behaviour-cloned on MiniWoB++ demonstrations: the web AutoUI analogue that collects
# configs/pipeline/miniwob-paper.yaml's data (Digi-Q paper, Sec. 5.1).
GUI_TINY_WEB_AGENT = "data/pretrained/gui-tiny-web-agent"
REBUILD = {
    GUI_TINY: "digiq pretrain-vlm --config configs/pretrain-vlm/gui-tiny.yaml",
    GUI_TINY_WEB: "digiq pretrain-vlm --config configs/pretrain-vlm/gui-tiny-web.yaml",
    GUI_TINY_WEB_AGENT: "PYTHONPATH=. python scripts/make_behaviour_model.py --config configs/behaviour-model/miniwob.yaml",
}


def resolve_model_folder(path: str) -> str:
    """``path`` as given when it exists, else relative to the repository root; a clear error otherwise."""
    p = Path(path)
    if p.exists():
        return str(p)
    in_repo = REPO_ROOT / p
    if not p.is_absolute() and in_repo.exists():
        return str(in_repo)
    hint = f"; rebuild it with `{REBUILD[path]}`" if path in REBUILD else ""
    raise DigiqError(f"model folder {path} not found (nor under {REPO_ROOT}){hint}")

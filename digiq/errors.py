"""Errors that the CLI turns into one clear line and a non-zero exit code (no traceback)."""

from __future__ import annotations


class DigiqError(Exception):
    """Base class for user-facing errors (bad input, missing artefacts, mismatched shapes)."""


class DataError(DigiqError):
    """Bad input data. Say *where*: file, trajectory and step (use :func:`where`)."""


def where(file: object = None, traj: object = None, step: object = None, key: str | None = None) -> str:
    """``"file.pt, trajectory 3, step 7, key 'reward'"``: the location prefix of a DataError message."""
    parts = []
    if file is not None:
        parts.append(str(file))
    if traj is not None:
        parts.append(f"trajectory {traj}")
    if step is not None:
        parts.append(f"step {step}")
    if key is not None:
        parts.append(f"key {key!r}")
    return ", ".join(parts)


def model_unavailable(setting: str, name: str, error: BaseException, what: str) -> DigiqError:
    """One line for a model ``name`` (set by ``setting``) that cannot be loaded, and why.

    Offline (``HF_HUB_OFFLINE``) a hub id loads only from the local Hugging Face cache; transformers then
    raises a multi-line OSError that names neither the setting nor offline mode.
    """
    from pathlib import Path

    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    try:
        from huggingface_hub import constants

        offline = bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        offline = False
    if "Unrecognized configuration class" in text:  # loaded, but another kind of model (a text-only one)
        reason = f"not a {what} digiq supports: {first}"
    elif Path(name).expanduser().exists():
        reason = f"the folder does not hold a loadable {what}: {first}"
    elif name.startswith(("/", ".", "~")):
        reason = "no such folder"
    elif offline:
        reason = (
            "not a local folder, and not in the Hugging Face cache: it is not available offline (HF_HUB_OFFLINE=1). "
            f"Download it once with network access, or set {setting} to a local folder"
        )
    else:
        reason = first
    return DigiqError(f"{setting}={name!r}: cannot load the {what}: {reason}")

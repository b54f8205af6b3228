"""``digiq import``: official Digi-Q / DigiRL ``.pt`` trajectory files -> a digiq dataset (+ feature cache).

An official file is a ``list`` of trajectories, each a ``list`` of step ``dict`` s (DigiRL-agent/digiq @
8181379, ``digiq/algorithms/offpolicy_train_loop.py:106-112``; DigiRL:
https://github.com/DigiRL-agent/digirl/issues/1). We read it with ``torch.load`` through an unpickler that
resolves only an allow-list of numpy and torch globals, in every pickle protocol (the official loader uses
``weights_only=False``, offpolicy_train_loop.py:106, which runs any pickled code); arbitrary pickles load
only with ``trust_pickle=true``.

Quirks handled (each is tested in tests/test_importer.py):

* ``action_list``: a list, or one ``"<split>"``-joined string (generate_more_click_images_batched.py:107);
  index 0 is the dataset action and becomes ``candidates``. A doubly-joined list (the vLLM path joins it
  again: DigiRL-agent/digiq @ 8181379, ``postprocess_data/vlm_infer/vllm_based/merge_slices.py:26``) is
  detected and refused.
* ``q_rep_out_list``: an ``(N, D)`` array (vLLM path) or a Python list of ``(D,)`` arrays (gradio path,
  client.py:103); only read when ``features_output`` is set.
* ``image_path``: the NEXT screenshot in raw collections (``{id}_{t+1}.png``, s_0 is ``{id}_0.png``), the
  current one after ``nv2v.py`` (which adds ``next_image_path``); see ``image_path_mode``.
* a literal ``<path_to_images>`` prefix (vis/view_trajs.py:113) is replaced by ``image_root``.
* ``reward`` / ``done`` as python or 0-d numpy values; ``mc_return`` recomputed with ``gamma``
  (the official loader recomputes it too, offpolicy_train_loop.py:110).
* released files lack ``traj_id`` / ``step_id`` (Digi-Q issue #14): derived from position.
* s_(t+1) is the step's own ``next_image_path`` / ``next_image_features`` where present (the trainer reads
  ``next_observation`` / ``next_image_features`` for V(s'), trainer.py:149), the next step otherwise; the
  cache's ``next_state`` holds it, and steps whose own next fields disagree with the next step are counted.

Usage::

    digiq import general-1008trajs.pt output=data/general image_root=/data/digiq-images
    digiq import a.pt output=data/a features_output=features/a   # also cache the released LLaVA features
    digiq import a.pt b.pt c.pt output=data/abc                  # several files, concatenated in order
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from digiq.actions import goal_from_observation, parse_action
from digiq.config import check, to_dict
from digiq.data.schema import FEATURES, dataset_info, discounted_returns, save_dataset
from digiq.errors import DataError, where
from digiq.utils.io import (
    OutputPlan,
    atomic_save_safetensors,
    atomic_write_json,
    config_fingerprint,
    plan_output,
    staged_dir,
    staged_output,
)
from digiq.utils.logging import get_logger

log = get_logger(__name__)

POSITIONAL = "inputs"
PATH_PLACEHOLDER = "<path_to_images>"
SPLIT_TOKEN = "<split>"
FEATURES_FORMAT = "digiq-features-v1"
_REQUIRED_KEYS = ("observation", "action", "reward", "done", "image_path")


@dataclasses.dataclass
class Config:
    # Official .pt trajectory file(s) (a list of trajectories, each a list of step dicts). Several files
    # are concatenated in order. A bare word on the command line sets this.
    inputs: tuple[str, ...] = ()
    # Output dataset folder (digiq schema, Arrow; written atomically with a _COMPLETE marker).
    output: str = ""
    # Replace an existing finished output. A failed import never damages the existing one.
    overwrite: bool = False
    # Nothing to redo when output (and features_output) already hold this very import (same input files
    # and settings); an import of other files or settings there is refused.
    resume: bool = False
    # Folder of the screenshots: substitutes the literal '<path_to_images>' prefix of released files;
    # relative image paths are resolved against it (then against the .pt file's folder); absolute paths
    # that do not exist are retried under it by their trailing components (authors' machines' paths).
    image_root: str = ""
    # What a step's image_path names: 'current' = s_t (after nv2v.py; next_image_path = s_{t+1});
    # 'next' = s_{t+1} (raw collection: {id}_{t+1}.png, s_0 = {id}_0.png); 'auto' = 'current' for a
    # trajectory whose steps have next_image_path, else 'next'.
    image_path_mode: Literal["auto", "current", "next"] = "auto"
    # Discount used to recompute mc_return (DigiRL collected with 0.95: the step dump in
    # https://github.com/DigiRL-agent/digirl/issues/1 has mc_return 0.8145 = 0.95^4).
    gamma: float = 0.95
    # Load with full pickle (runs code from the file). Only for files from a source you trust.
    trust_pickle: bool = False
    # Also write the released per-candidate LLaVA features (q_rep_out_list) as a digiq feature cache here,
    # so train-critic can run without re-extracting. Empty: skip.
    features_output: str = ""
    # dtype of the written feature cache.
    features_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Rows per feature shard.
    features_shard_rows: int = 1024
    # Import only the first this-many trajectories (all files together); null: all.
    max_trajectories: int | None = None

    def validate(self) -> None:
        check(len(self.inputs) > 0, "inputs: give at least one .pt file (digiq import FILE.pt output=DIR)")
        check(bool(self.output), "output: set the output dataset folder (output=DIR)")
        check(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        check(self.features_shard_rows > 0, "features_shard_rows must be > 0")
        check(
            self.max_trajectories is None or self.max_trajectories > 0,
            "max_trajectories must be > 0 (or null for all)",
        )
        check(
            not self.features_output or Path(self.features_output).resolve() != Path(self.output).resolve(),
            "features_output must differ from output",
        )


@dataclasses.dataclass
class ImportSummary:
    trajectories: int
    steps: int
    success_rate: float
    candidates_min: int
    candidates_mean: float
    candidates_max: int
    invalid_actions: int
    traj_ids: str
    output: str
    features_output: str = ""
    # Steps whose own next_* fields differ from the following step's current fields.
    next_mismatches: int = 0
    # Trajectories whose last step is not done.
    truncated: int = 0

    def lines(self) -> list[str]:
        out = [
            f"imported {self.trajectories} trajectories, {self.steps} steps -> {self.output}",
            f"success rate (trajectories with a positive reward): {self.success_rate:.3f}",
            f"candidates per step: min {self.candidates_min}, mean {self.candidates_mean:.2f}, "
            f"max {self.candidates_max}",
            f"dataset actions that do not parse: {self.invalid_actions}",
            f"traj_id from: {self.traj_ids}",
            f"trajectories that end without done (cut short; their last step is terminal in train-critic): "
            f"{self.truncated}",
            f"steps whose next_observation / next_image_features differ from the following step: "
            f"{self.next_mismatches}",
        ]
        if self.features_output:
            out.append(f"features -> {self.features_output}")
        return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def numpy_safe_globals() -> list[Any]:
    """The numpy globals a ``torch.save`` of numpy arrays/scalars needs: ``_reconstruct``, ``ndarray``,
    ``dtype``, ``scalar``, ``_frombuffer`` and the per-dtype ``numpy.dtypes.*DType`` classes (numpy 2 pickles a dtype through
    its class). Files written under numpy 1.x name the first two ``numpy.core.multiarray.*``; those names are
    aliases (``(object, name)`` entries). Object arrays stay safe: their items go through the same
    restricted unpickler.
    """
    import numpy.dtypes
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer  # protocol 5 pickles an array through it

    allowed: list[Any] = [np.ndarray, np.dtype, _reconstruct, scalar, _frombuffer]
    allowed += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    allowed += [
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (scalar, "numpy.core.multiarray.scalar"),
        (_frombuffer, "numpy.core.numeric._frombuffer"),
    ]
    return allowed


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return str(entry[1])
    return f"{entry.__module__}.{entry.__qualname__}"


def allowed_globals() -> dict[str, Any]:
    """``"module.name" -> object`` of every global an official file may reference: numpy's (above), and
    what torch's own ``weights_only`` loader allows for tensors (rebuild functions, dtypes, ``torch.Size``,
    ``OrderedDict``, ...) plus anything registered with ``torch.serialization.add_safe_globals``."""
    import torch
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    for entry in [*torch.serialization.get_safe_globals(), *numpy_safe_globals()]:
        obj = entry[0] if isinstance(entry, tuple) else entry
        allowed[_global_name(entry)] = obj
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle references a global outside :func:`allowed_globals`; ``name`` is ``module.global``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refused global {name}")
        self.name = name


def _py3_name(module: str, name: str, proto: int) -> str:
    """``module.name`` as Python 3 reads it: protocols < 3 store Python 2 names (``__builtin__``,
    ``commands``), which the unpickler maps back (``fix_imports``)."""
    import _compat_pickle

    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _restricted_pickle_module() -> Any:
    """A ``pickle_module`` for ``torch.load`` whose unpickler resolves only :func:`allowed_globals`.

    Torch's ``weights_only`` unpickler reads protocol 2 only (the protocol ``torch.save`` writes by default):
    a file saved with ``pickle_protocol=4`` stops at its first FRAME opcode. The standard unpickler with
    ``find_class`` restricted (the ``pickle`` documentation's "Restricting Globals") reads every protocol, and
    every global reaches ``find_class`` whether a GLOBAL or a STACK_GLOBAL opcode names it.
    """
    import types

    allowed = allowed_globals()

    class Unpickler(pickle.Unpickler):
        def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(file, *args, **kwargs)
            self._proto = _peek_protocol(file)

        def find_class(self, module: str, name: str) -> Any:
            full = _py3_name(module, name, self._proto)
            if full not in allowed:
                raise RefusedGlobal(full)
            return allowed[full]

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    mod = types.ModuleType("digiq_restricted_pickle")
    mod.Unpickler = Unpickler  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    mod.__version__ = "1"  # type: ignore[attr-defined]
    return mod


def _peek_protocol(file: Any) -> int:
    """The protocol a pickle stream declares (its leading PROTO opcode); 0 when it has none."""
    try:
        pos = file.tell()
        head = file.read(2)
        file.seek(pos)
    except (AttributeError, OSError):
        return 2  # an unseekable stream: torch's default protocol
    return head[1] if len(head) == 2 and head[0] == pickle.PROTO[0] else 0


def pickle_globals(data: bytes) -> set[str]:
    """Every global a pickle stream references (``module.name``), read statically (nothing is unpickled).

    GLOBAL / INST carry the names in their argument; STACK_GLOBAL (protocol >= 4) takes them from the two
    strings pushed before it, which may come from the memo.
    """
    import pickletools

    names: set[str] = set()
    proto, memo, recent = 0, {}, [None, None]
    pushes_str = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING"}
    pushes_str |= {"BINSTRING", "SHORT_BINSTRING"}
    for op, arg, _pos in pickletools.genops(data):
        kind = op.name
        if kind == "PROTO":
            proto = int(arg)
        elif kind in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            names.add(_py3_name(module, name, proto))
        elif kind == "STACK_GLOBAL":
            module, name = recent[-2], recent[-1]
            if isinstance(module, str) and isinstance(
                name, str
            ):  # else built at run time: find_class names it
                names.add(_py3_name(module, name, proto))
            recent.append(None)
        elif kind in pushes_str:
            recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif kind == "MEMOIZE":
            memo[len(memo)] = recent[-1]
        elif kind in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = recent[-1]
        elif kind in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(arg))
        elif kind != "FRAME":
            recent.append(None)
        del recent[:-2]
    return names


def _storage_type(name: str) -> bool:
    """``torch.FloatStorage`` and the like: torch's loader resolves those itself, before ``find_class``."""
    import torch

    try:
        torch.serialization.StorageType(name.rsplit(".", 1)[-1])
    except (KeyError, AttributeError):
        return False
    return "Storage" in name


def refused_globals(path: Path, first: str = "") -> list[str]:
    """The globals of ``path``'s pickle outside the allow-list, e.g. ``['posix.system']``.

    Read statically, so every refused global is named, not only the first one the unpickler stopped at
    (``first``, the fallback for a file whose pickle cannot be scanned).
    """
    import zipfile

    names: set[str] = set()
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            allowed = allowed_globals()
            names = {n for n in pickle_globals(zf.read(pkl)) if n not in allowed and not _storage_type(n)}
    except Exception:  # noqa: BLE001 - a damaged or legacy (non-zip) file: name the one we saw
        names = set()
    if first:
        names.add(first)
    return sorted(names)


def load_pt(path: str | Path, trust_pickle: bool = False) -> Any:
    """``torch.load`` an official trajectory file; refuses pickled code unless ``trust_pickle``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a broken pickle raises anything
            raise DataError(f"{path}: cannot be read as a torch/pickle file: {type(e).__name__}: {e}") from e
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module()
        )
    except RefusedGlobal as e:
        raise DataError(
            f"{path}: refused to unpickle {', '.join(refused_globals(path, e.name))}: the file holds Python "
            "objects beyond lists, dicts, strings, numbers, numpy arrays and tensors, and unpickling them can "
            "run arbitrary code. If you trust the file's source, re-run with trust_pickle=true"
        ) from e
    except Exception as e:  # noqa: BLE001 - zip/EOF/format errors come as many types
        raise DataError(f"{path}: not a readable torch file: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------------
# Field conversion
# --------------------------------------------------------------------------------------------------


def _scalar(value: Any, loc: str, key: str) -> float:
    """A python/numpy/0-d (or 1-element) array/tensor number as float; DataError otherwise."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise DataError(f"{loc}, key {key!r}: expected a scalar, got an array of shape {value.shape}")
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)):
        return float(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    raise DataError(f"{loc}, key {key!r}: expected a number, got {type(value).__name__} {value!r:.60}")


def _reward(step: dict, loc: str) -> float:
    r = _scalar(step["reward"], loc, "reward")
    if not math.isfinite(r):
        raise DataError(f"{loc}, key 'reward': non-finite reward {r}")
    return r


def _done(step: dict, loc: str) -> bool:
    d = _scalar(step["done"], loc, "done")
    if d not in (0.0, 1.0):
        raise DataError(f"{loc}, key 'done': expected a bool or 0/1, got {d}")
    return bool(d)


def _string(step: dict, key: str, loc: str) -> str:
    value = step[key]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, str):
        raise DataError(f"{loc}, key {key!r}: expected a string, got {type(value).__name__}")
    return str(value)


def candidates_from(value: Any, action: str, loc: str) -> list[str]:
    """``action_list`` (list / array / ``"<split>"``-joined string) -> candidates, index 0 = dataset action."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(SPLIT_TOKEN)
        # merge_slices.py:26 joins an already-joined string again: "<split>" between single characters.
        if len(items) > 4 and sum(len(s) <= 1 for s in items) > 0.8 * len(items):
            raise DataError(
                f"{loc}, key 'action_list': looks joined twice with '<split>' (single characters between "
                "separators; the official merge_slices.py bug): regenerate the candidates"
            )
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = list(np.asarray(value, dtype=object).reshape(-1)) if isinstance(value, np.ndarray) else value
    else:
        raise DataError(
            f"{loc}, key 'action_list': expected a list or a '<split>'-joined string, got {type(value).__name__}"
        )
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise DataError(f"{loc}, key 'action_list': item {i} is {type(item).__name__}, not a string")
        out.append(str(item))
    if not out:
        return []
    if out[0].strip() != action.strip():
        raise DataError(
            f"{loc}, key 'action_list': item 0 must be the dataset action (official convention), got "
            f"{out[0]!r:.80} vs action {action!r:.80}"
        )
    out[0] = action
    return out


def _as_array(value: Any, loc: str, key: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    if isinstance(value, (list, tuple)):
        parts = [_as_array(v, loc, key) for v in value]
        shapes = {p.shape for p in parts}
        if len(shapes) > 1:
            raise DataError(f"{loc}, key {key!r}: list items have different shapes {sorted(shapes)}")
        if not parts:
            raise DataError(f"{loc}, key {key!r}: empty list")
        value = np.stack(parts)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
        raise DataError(f"{loc}, key {key!r}: expected a numeric array, got {type(value).__name__}")
    arr = np.asarray(value, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{loc}, key {key!r}: holds NaN or inf")
    return arr


# --------------------------------------------------------------------------------------------------
# Image paths
# --------------------------------------------------------------------------------------------------

_INDEX_RE = re.compile(r"^(.*_)(\d+)(\.[A-Za-z0-9]+)$")


def _previous_index_path(path: str, loc: str) -> str:
    """``{id}_{k}.png`` -> ``{id}_{k-1}.png`` (nv2v.py:16-20 does ``_1.png`` -> ``_0.png`` for step 0)."""
    m = _INDEX_RE.match(path)
    if m is None or int(m.group(2)) == 0:
        raise DataError(
            f"{loc}, key 'image_path': image_path_mode is 'next' (image_path names s_(t+1)) but {path!r} "
            "does not end in _<k>.png with k >= 1, so s_0 cannot be derived; try image_path_mode=current"
        )
    return f"{m.group(1)}{int(m.group(2)) - 1}{m.group(3)}"


class _ImageResolver:
    """Turns a stored path into an existing file and returns its verified bytes (cached per path)."""

    def __init__(self, image_root: str, pt_dir: Path) -> None:
        self.root = Path(image_root).expanduser() if image_root else None
        self.pt_dir = pt_dir
        self._cache: dict[str, bytes] = {}

    def resolve(self, stored: str, loc: str) -> Path:
        text = stored
        if text.startswith(PATH_PLACEHOLDER):
            if self.root is None:
                raise DataError(
                    f"{loc}: image path {stored!r} starts with the placeholder {PATH_PLACEHOLDER}; "
                    "set image_root=<folder of the released images>"
                )
            return self.root / text[len(PATH_PLACEHOLDER) :].lstrip("/\\")
        p = Path(text).expanduser()
        if not p.is_absolute():
            # image_root first; the .pt file's folder as a fallback (post-processed files keep paths
            # relative to where they were written)
            options = [self.root / p] if self.root is not None else []
            options.append(self.pt_dir / p)
            return next((o for o in options if o.exists()), options[0])
        if p.exists() or self.root is None:
            return p
        # An absolute path from the authors' machine: look for its trailing components under image_root.
        parts = p.parts[1:]
        for k in range(len(parts), 0, -1):
            candidate = self.root.joinpath(*parts[-k:])
            if candidate.exists():
                return candidate
        return p

    def read(self, stored: str, loc: str) -> bytes:
        if stored in self._cache:
            return self._cache[stored]
        path = self.resolve(stored, loc)
        if not path.is_file():
            raise DataError(f"{loc}: image {stored!r} not found (looked at {path}); check image_root")
        data = path.read_bytes()
        _verify_image(data, f"{loc}: image {stored!r} ({path})")
        if len(self._cache) > 64:  # only neighbouring steps share images
            self._cache.clear()
        self._cache[stored] = data
        return data


def _verify_image(data: bytes, loc: str) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # checksums (PNG CRCs)
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode catches truncation
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"{loc} does not decode: {type(e).__name__}: {e}") from e


def _screen_paths(traj: list[dict], mode: str, locs: list[str]) -> list[tuple[str, str]]:
    """(stored path of s_t, stored path of s_{t+1}) for every step of one trajectory."""
    if mode == "auto":
        mode = "current" if all("next_image_path" in s for s in traj) else "next"
    stored = []
    for step, loc in zip(traj, locs):
        if not isinstance(step["image_path"], str) or not step["image_path"]:
            raise DataError(
                f"{loc}, key 'image_path': expected a path string, got {step['image_path']!r:.60}"
            )
        stored.append(step["image_path"])
    out = []
    if mode == "current":
        for t, (step, loc) in enumerate(zip(traj, locs)):
            nxt = step.get("next_image_path")
            if nxt is None:
                if t + 1 == len(traj):
                    raise DataError(
                        f"{loc}, key 'next_image_path': missing on the last step, so s_(t+1) is unknown "
                        "(image_path_mode=current); for raw collections use image_path_mode=next"
                    )
                nxt = stored[t + 1]
            if not isinstance(nxt, str) or not nxt:
                raise DataError(f"{loc}, key 'next_image_path': expected a path string, got {nxt!r:.60}")
            out.append((stored[t], nxt))
        return out
    for t in range(len(traj)):
        cur = stored[t - 1] if t > 0 else _previous_index_path(stored[0], locs[0])
        out.append((cur, stored[t]))
    return out


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Traj:
    file: Path
    index: int  # position in its file
    steps: list[dict]
    official_id: int | None


def _trajectories(cfg: Config) -> Iterator[_Traj]:
    """Load every input file and yield its trajectories after structural checks."""
    budget = cfg.max_trajectories
    for name in cfg.inputs:
        if budget is not None and budget <= 0:
            return
        path = Path(name)
        data = load_pt(path, cfg.trust_pickle)
        if not isinstance(data, (list, tuple)):
            raise DataError(f"{path}: expected a list of trajectories, got {type(data).__name__}")
        if len(data) == 0:
            raise DataError(f"{path}: holds no trajectories (an empty list)")
        for i, traj in enumerate(data):
            if budget is not None and budget <= 0:
                return
            loc = where(path, i)
            if not isinstance(traj, (list, tuple)):
                raise DataError(f"{loc}: expected a list of step dicts, got {type(traj).__name__}")
            if len(traj) == 0:
                raise DataError(f"{loc}: empty trajectory (no steps)")
            for t, step in enumerate(traj):
                if not isinstance(step, dict):
                    raise DataError(f"{where(path, i, t)}: expected a step dict, got {type(step).__name__}")
                for key in _REQUIRED_KEYS:
                    if key not in step:
                        raise DataError(
                            f"{where(path, i, t, key)}: missing (a step needs {list(_REQUIRED_KEYS)})"
                        )
            steps = list(traj)
            # Steps may carry step_id (nv2v.py:25-28); the official merge can reorder them.
            if all("step_id" in s for s in steps):
                ids = [int(_scalar(s["step_id"], where(path, i, t), "step_id")) for t, s in enumerate(steps)]
                if sorted(ids) != list(range(len(steps))):
                    raise DataError(f"{loc}: step_id values {ids} are not 0..{len(steps) - 1}")
                steps = [s for _, s in sorted(zip(ids, steps), key=lambda p: p[0])]
            official = None
            if all("traj_id" in s for s in steps):
                tids = {int(_scalar(s["traj_id"], where(path, i, t), "traj_id")) for t, s in enumerate(steps)}
                if len(tids) != 1:
                    raise DataError(f"{loc}: steps disagree on traj_id ({sorted(tids)})")
                official = tids.pop()
            if budget is not None:
                budget -= 1
            yield _Traj(path, i, steps, official)


@dataclasses.dataclass
class _StepFeatures:
    """One step's features for the cache: f(s_t) (None without ``image_features``), the candidates'
    (N, D) features, and f(s_{t+1}) (None where neither the step nor a next step says what s_{t+1} is)."""

    state: np.ndarray | None
    actions: np.ndarray
    next_state: np.ndarray | None


@dataclasses.dataclass
class _NextCheck:
    """Steps whose own next_* fields disagree with the following step's current fields, and trajectories
    that end without ``done`` (cut by the horizon or an emulator error)."""

    mismatches: int = 0
    first_mismatch: str = ""
    truncated: list[str] = dataclasses.field(default_factory=list)
    truncated_unknown: list[str] = dataclasses.field(default_factory=list)


def _optional_array(step: dict, key: str, loc: str) -> np.ndarray | None:
    value = step.get(key)
    return None if value is None else _as_array(value, loc, key).reshape(-1)


def _optional_string(step: dict, key: str, loc: str) -> str | None:
    value = step.get(key)
    return None if value is None or (isinstance(value, str) and not value) else _string(step, key, loc)


def _rows(
    cfg: Config, trajs: list[_Traj], ids: list[int], check: _NextCheck
) -> Iterator[tuple[dict, str, Any]]:
    """(encoded-ready row, loc, _StepFeatures-or-None) for every step, in dataset order.

    s_{t+1} is the step's own ``next_*`` fields where it has them: the official trainer reads
    ``next_observation`` and ``next_image_features`` for V(s') (DigiRL-agent/digiq @ 8181379,
    ``digiq/algorithms/digiq/trainer.py:149``, frame-stacked as ``[cur, next]`` at
    ``offpolicy_train_loop.py:22``), so they are the truth even where the next row says otherwise; the next
    row stands in only where they are absent.
    """

    resolvers: dict[Path, _ImageResolver] = {}
    for tr, tid in zip(trajs, ids):
        resolver = resolvers.setdefault(tr.file, _ImageResolver(cfg.image_root, tr.file.parent))
        locs = [where(tr.file, tr.index, t) for t in range(len(tr.steps))]
        rewards = [_reward(s, loc) for s, loc in zip(tr.steps, locs)]
        dones = [_done(s, loc) for s, loc in zip(tr.steps, locs)]
        mc = discounted_returns(rewards, cfg.gamma)
        paths = _screen_paths(tr.steps, cfg.image_path_mode, locs)
        obs = [_string(s, "observation", loc) for s, loc in zip(tr.steps, locs)]
        next_obs = [_optional_string(s, "next_observation", loc) for s, loc in zip(tr.steps, locs)]
        states: list[np.ndarray | None] = []
        next_states: list[np.ndarray | None] = []
        if cfg.features_output:
            states = [_optional_array(s, "image_features", loc) for s, loc in zip(tr.steps, locs)]
            next_states = [_optional_array(s, "next_image_features", loc) for s, loc in zip(tr.steps, locs)]
        last = len(tr.steps) - 1
        for t in range(last):
            own_f, row_f = (next_states[t], states[t + 1]) if cfg.features_output else (None, None)
            differs = next_obs[t] is not None and next_obs[t] != obs[t + 1]
            if own_f is not None and row_f is not None:
                differs |= own_f.shape != row_f.shape or not np.allclose(own_f, row_f, rtol=1e-5, atol=1e-6)
            if differs:
                check.mismatches += 1
                check.first_mismatch = check.first_mismatch or locs[t]
        if not dones[last]:
            check.truncated.append(locs[last])
            if cfg.features_output and next_states[last] is None:
                check.truncated_unknown.append(locs[last])
        for t, (step, loc) in enumerate(zip(tr.steps, locs)):
            action = _string(step, "action", loc)
            task = (
                _string(step, "task", loc) if step.get("task") is not None else goal_from_observation(obs[t])
            )
            cands = candidates_from(step.get("action_list"), action, loc)
            feats = None
            if cfg.features_output:
                nxt = next_states[t] if next_states[t] is not None else (states[t + 1] if t < last else None)
                feats = _StepFeatures(states[t], _candidate_features(step, cands, loc), nxt)
            cur, nxt_path = paths[t]
            row = {
                "traj_id": tid,
                "step_id": t,
                "task": task,
                "observation": obs[t],
                "screenshot": {"bytes": resolver.read(cur, loc), "path": None},
                "next_screenshot": {"bytes": resolver.read(nxt_path, loc), "path": None},
                "action": action,
                "reward": rewards[t],
                "done": dones[t],
                "mc_return": float(mc[t]),
                "candidates": cands,
                "state_key": "",
            }
            yield row, loc, feats


def _candidate_features(step: dict, cands: list[str], loc: str) -> np.ndarray:
    """(N, D) per-candidate features of one step."""
    if "q_rep_out_list" in step and step["q_rep_out_list"] is not None:
        acts = _as_array(step["q_rep_out_list"], loc, "q_rep_out_list")
    elif "q_rep_out" in step and step["q_rep_out"] is not None and len(cands) <= 1:
        acts = _as_array(step["q_rep_out"], loc, "q_rep_out").reshape(1, -1)
    else:
        raise DataError(f"{loc}, key 'q_rep_out_list': missing, but features_output is set")
    if acts.ndim == 1:
        acts = acts.reshape(1, -1)
    if acts.ndim != 2:
        raise DataError(f"{loc}, key 'q_rep_out_list': expected shape (N, D), got {acts.shape}")
    if cands and acts.shape[0] != len(cands):
        raise DataError(
            f"{loc}, key 'q_rep_out_list': {acts.shape[0]} features for {len(cands)} candidate actions"
        )
    return acts


def import_fingerprint(cfg: Config) -> dict[str, Any]:
    """The import's settings and its input files (size and modification time: a re-released file differs)."""
    files = []
    for f in cfg.inputs:
        st = Path(f).stat() if Path(f).is_file() else None
        files.append([str(Path(f).resolve()), st.st_size if st else None, int(st.st_mtime) if st else None])
    return {**config_fingerprint(cfg, exclude=("inputs",)), "input_files": files}


def run(cfg: Config) -> ImportSummary:
    """Import ``cfg.inputs`` into ``cfg.output`` (and ``cfg.features_output``); returns a summary."""
    from datasets import Dataset, load_from_disk
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    output = Path(cfg.output)
    fingerprint = import_fingerprint(cfg)
    plans = [
        plan_output(target, "import", resume=cfg.resume, overwrite=cfg.overwrite, fingerprint=fingerprint)
        for target in [cfg.output] + ([cfg.features_output] if cfg.features_output else [])
    ]
    if all(p.finished for p in plans):
        stored = dataset_info(output)["summary"]
        summary = ImportSummary(**stored, output=str(output), features_output=cfg.features_output)
        log.info("%s already holds this import: nothing to do", output)
        for line in ["already imported: " + summary.lines()[0], *summary.lines()[1:]]:
            print(line)  # noqa: T201 - the command's report on stdout
        return summary

    trajs = list(_trajectories(cfg))
    ids, id_source = _assign_ids(trajs)
    n_steps = sum(len(t.steps) for t in trajs)

    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.import-", dir=output.parent))
    try:
        arrow = scratch / "rows.arrow"
        feature_rows: list[_StepFeatures] = []
        feature_locs: list[str] = []
        check = _NextCheck()
        n_cands: list[int] = []
        invalid = 0
        successes: dict[int, bool] = {}
        writer = ArrowWriter(features=FEATURES, path=str(arrow))
        try:
            rows = _rows(cfg, trajs, ids, check)
            for row, loc, feats in tqdm(rows, total=n_steps, desc="import", unit="step"):
                writer.write(FEATURES.encode_example(row))
                n_cands.append(len(row["candidates"]))
                invalid += not parse_action(row["action"]).is_valid
                successes[row["traj_id"]] = successes.get(row["traj_id"], False) or row["reward"] > 0
                if feats is not None:
                    feature_rows.append(feats)
                    feature_locs.append(loc)
            writer.finalize()
        finally:
            writer.close()
        if cfg.features_output:
            _check_feature_rows(feature_rows, feature_locs)
        _log_next_check(check)
        summary = ImportSummary(
            trajectories=len(trajs),
            steps=n_steps,
            success_rate=float(np.mean(list(successes.values()))) if successes else 0.0,
            candidates_min=min(n_cands),
            candidates_mean=float(np.mean(n_cands)),
            candidates_max=max(n_cands),
            invalid_actions=invalid,
            traj_ids=id_source,
            output=str(output),
            features_output=cfg.features_output,
            next_mismatches=check.mismatches,
            truncated=len(check.truncated),
        )
        info = {
            "source": "import",
            "inputs": [str(p) for p in cfg.inputs],
            "gamma": cfg.gamma,
            "traj_id_source": id_source,
            "config": to_dict(cfg),
            # (where it was written is the config's, not the data's)
            "summary": {
                k: v for k, v in dataclasses.asdict(summary).items() if k not in ("output", "features_output")
            },
        }
        save_dataset(Dataset.from_file(str(arrow)), output, info, plan=plans[0])
        if cfg.features_output:
            # Everything was validated above, so only an I/O error can stop us between the two outputs.
            fingerprint = load_from_disk(str(output))._fingerprint  # what a reader of `output` sees
            write_feature_cache(
                Path(cfg.features_output),
                [f.state for f in feature_rows],
                [f.actions for f in feature_rows],
                dtype=cfg.features_dtype,
                shard_rows=cfg.features_shard_rows,
                meta={
                    "dataset": str(output),
                    "dataset_fingerprint": fingerprint,
                    "source_files": [str(p) for p in cfg.inputs],
                },
                next_state_rows=[f.next_state for f in feature_rows],
                plan=plans[1],
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for line in summary.lines():
        print(line)  # noqa: T201 - the command's report on stdout
    return summary


def _assign_ids(trajs: list[_Traj]) -> tuple[list[int], str]:
    """The official traj_id when every trajectory has a distinct one, else the position (Digi-Q issue #14)."""
    official = [t.official_id for t in trajs]
    if all(o is not None for o in official) and len(set(official)) == len(official):
        return [int(o) for o in official], "file (traj_id key)"
    if any(o is not None for o in official):
        log.warning(
            "traj_id missing or repeated in some trajectories: numbering all trajectories by position"
        )
    return list(range(len(trajs))), "position"


def _check_feature_rows(rows: list[_StepFeatures], locs: list[str]) -> None:
    """All rows must stack into one cache: same state presence and widths, same feature width. An error
    names the first step that differs from the first step (file, trajectory, step) and that first step."""
    first = rows[0]
    for f, loc in zip(rows, locs):
        if (f.state is None) != (first.state is None):
            lacks, has = (loc, locs[0]) if f.state is None else (locs[0], loc)
            raise DataError(
                f"{lacks}, key 'image_features': missing, but {has} has it; every step needs it (or none) "
                "to build one state-feature tensor"
            )
        if f.state is not None and f.state.shape != first.state.shape:
            raise DataError(
                f"{loc}, key 'image_features': width {f.state.shape[0]}, but {locs[0]} has width "
                f"{first.state.shape[0]}; every step needs the same width"
            )
        if f.next_state is not None and first.state is not None and f.next_state.shape != first.state.shape:
            raise DataError(
                f"{loc}, key 'next_image_features': width {f.next_state.shape[0]}, but image_features at "
                f"{locs[0]} has width {first.state.shape[0]}"
            )
        if f.actions.shape[1] != first.actions.shape[1]:
            raise DataError(
                f"{loc}, key 'q_rep_out_list': feature width {f.actions.shape[1]}, but {locs[0]} has width "
                f"{first.actions.shape[1]}; every step needs the same width"
            )


def _log_next_check(check: _NextCheck) -> None:
    """Say where s_(t+1) of the cache and the rows train-critic reads part ways (see docs/aitw.md)."""
    if check.mismatches:
        log.warning(
            "%d step(s) have next_observation / next_image_features that differ from the following step's "
            "observation / image_features (first: %s). The feature cache's next_state holds each step's own "
            "next_image_features (the official trainer's s'); train-critic reads s' from the following row",
            check.mismatches,
            check.first_mismatch,
        )
    if check.truncated:
        log.warning(
            "%d trajectory(ies) end without done (cut short), e.g. %s: their last step's s' is its own next "
            "fields, and train-critic treats the step as terminal (no bootstrap from V(s'))",
            len(check.truncated),
            "; ".join(check.truncated[:3]),
        )
    if check.truncated_unknown:
        log.warning(
            "%d of them have no next_image_features either (%s): next_state is unknown there (zeros, listed "
            "in the manifest's next_state_unknown_rows)",
            len(check.truncated_unknown),
            "; ".join(check.truncated_unknown[:3]),
        )


# --------------------------------------------------------------------------------------------------
# Feature cache writer (the shared digiq-features-v1 format; kept here to avoid a merge conflict with
# digiq/data/features.py, which owns the reader)
# --------------------------------------------------------------------------------------------------


def write_feature_cache(
    path: Path,
    state_rows: list[np.ndarray | None],
    action_rows: list[np.ndarray],
    dtype: str = "float32",
    shard_rows: int = 1024,
    meta: dict | None = None,
    overwrite: bool = False,
    next_state_rows: list[np.ndarray | None] | None = None,
    plan: OutputPlan | None = None,
) -> Path:
    """Write a ``digiq-features-v1`` cache: ``state`` (R, Ds), ``actions`` (R, N, Da), ``valid`` (R, N),
    and with ``next_state_rows`` (and state features) ``next_state`` (R, Ds), f(s_{t+1}) per row.

    Rows with fewer candidates than the widest row are zero-padded and marked in ``valid``. With no
    ``image_features`` the state is a zero column (Ds = 1), noted in the manifest (``state_features``).
    ``next_state`` rows nobody knows (a last step without ``next_image_features``) are zeros, listed in the
    manifest's ``next_state_unknown_rows``.
    """
    import torch

    n_rows = len(action_rows)
    if n_rows == 0:
        raise DataError(f"{path}: no rows to write")
    n_cand = max(a.shape[0] for a in action_rows)
    dims = {a.shape[1] for a in action_rows}
    if len(dims) != 1:
        raise DataError(f"q_rep_out_list feature widths differ across steps: {sorted(dims)}")
    action_dim = dims.pop()
    has_state = state_rows and state_rows[0] is not None
    state_dim = int(state_rows[0].shape[0]) if has_state else 1
    padded = any(a.shape[0] != n_cand for a in action_rows)
    with_next = bool(has_state and next_state_rows is not None)
    unknown_next = [i for i, n in enumerate(next_state_rows or []) if n is None] if with_next else []
    tdtype = getattr(torch, dtype)
    shards = []
    with staged_output(plan) if plan is not None else staged_dir(path, overwrite=overwrite) as tmp:
        for index, start in enumerate(range(0, n_rows, shard_rows)):
            end = min(start + shard_rows, n_rows)
            acts = np.zeros((end - start, n_cand, action_dim), dtype=np.float32)
            valid = np.zeros((end - start, n_cand), dtype=bool)
            for j, a in enumerate(action_rows[start:end]):
                acts[j, : a.shape[0]] = a
                valid[j, : a.shape[0]] = True
            if has_state:
                state = np.stack([s for s in state_rows[start:end]]).astype(np.float32)
            else:
                state = np.zeros((end - start, 1), dtype=np.float32)
            tensors = {
                "state": torch.from_numpy(state).to(tdtype),
                "actions": torch.from_numpy(acts).to(tdtype),
            }
            if with_next:
                nxt = np.zeros_like(state)
                for j, n in enumerate(next_state_rows[start:end]):
                    if n is not None:
                        nxt[j] = n
                tensors["next_state"] = torch.from_numpy(nxt).to(tdtype)
            if padded:
                tensors["valid"] = torch.from_numpy(valid)
            name = f"shard-{index:05d}.safetensors"
            atomic_save_safetensors(tensors, tmp / name)
            shards.append({"file": name, "start": start, "end": end})
        manifest = {
            "format": FEATURES_FORMAT,
            "num_rows": n_rows,
            "num_candidates": n_cand,
            "state_dim": state_dim,
            "action_dim": action_dim,
            "dtype": dtype,
            "model": "official Digi-Q LLaVA features (imported q_rep_out_list)",
            "layer": -1,
            "rendering": "imported",
            "state_features": (
                "image_features (official BLIP-2 pooled, Salesforce/blip2-opt-2.7b)"
                if has_state
                else "none: zeros of dim 1 (the file has no image_features)"
            ),
            **(
                {
                    "next_state": "each step's own next_image_features, else the next step's image_features",
                    "next_state_unknown_rows": unknown_next,
                }
                if with_next
                else {}
            ),
            "shards": shards,
            **(meta or {}),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return path

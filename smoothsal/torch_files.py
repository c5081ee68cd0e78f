"""Torch files on disk: read weights only (nothing in a file runs), write atomically.

Model checkpoints, surrogates and training states all pass through here, so a file that cannot be read
(TorchScript, a whole pickled model, a torn file) is named with its fix in one line.
"""

from __future__ import annotations

import io
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import BadCheckpoint, MissingInput, plain
from .files import atomic_path

_SAVE_WEIGHTS = "torch.save(model.state_dict(), PATH) in the code that builds the model, and pass that file"
_TRUST = "if you trust the file, pass --allow-pickle (workflow: model.allow_pickle: true); else "
_PICKLED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``): a zip holding compiled code beside the weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torch_file(
    path: Path, what: str, fix: str = "save it with torch.save(state_dict)", *, allow_pickle: bool = False
) -> object:
    """``torch.load`` (weights only: nothing in the file runs) with one-line errors naming the file.

    A TorchScript archive and a whole pickled model get a line of their own: smoothsal hooks and replaces
    modules of an eager ``nn.Module`` built by code, so TorchScript needs the weights saved alone, and a
    pickled model (which runs code from the file when loaded) the explicit ``allow_pickle`` opt-in.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{what} {path} does not exist; check the path")
    if is_torchscript(path):
        raise BadCheckpoint(
            f"{what} {path} is a TorchScript archive, which cannot be explained (hooks and module replacement "
            f"need the eager model); save its weights instead: torch.jit.load(PATH).state_dict() or {_SAVE_WEIGHTS}"
        )
    try:
        with warnings.catch_warnings():  # torch's own advice (weights_only=False) is not ours to give
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # torch.load raises anything from pickle, zipfile and its own checks
        text = plain(str(err)).strip()
        pickled = _PICKLED_GLOBAL.search(text)
        if pickled:
            trust = _TRUST if what == "checkpoint" else ""
            raise BadCheckpoint(
                f"{what} {path} holds a pickled {pickled.group(1)} (e.g. a whole model saved with "
                f"torch.save(model)), and loading it runs code from the file: {trust}save the weights alone: "
                f"{_SAVE_WEIGHTS}"
            ) from err
        first = " ".join(text.splitlines()[0].split()) if text else type(err).__name__
        raise BadCheckpoint(f"{what} {path} could not be read as a torch file ({first}); {fix}") from err


def load_torch_dict(path: Path, what: str, fix: str) -> dict:
    """``load_torch_file`` of a file that must hold a dict (a smoothsal surrogate, model or state file)."""
    obj = load_torch_file(path, what, fix)
    if not isinstance(obj, dict):
        raise BadCheckpoint(f"{path} is not a {what} (it holds a {type(obj).__name__}); {fix}")
    return obj


def save_torch_file(obj: object, path: str | Path) -> None:
    """``torch.save`` to a temporary file renamed into place: a kill never leaves a torn file."""
    buffer = io.BytesIO()  # serialised in memory, then written by Python: a full disk is then an
    torch.save(obj, buffer)  # OSError (BadOutput naming the file), not torch's internal writer message
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())

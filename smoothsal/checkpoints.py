"""Model checkpoints: reading their weights into a built model (the one place that does), and their hashes.

A checkpoint belongs to one architecture; everything that can be wrong with it (another arch, other class
count, wrapper prefixes, NaN weights, a pickled module without the opt-in) is one line naming the file and
the fix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .errors import BadCheckpoint, MissingInput
from .torch_files import load_torch_file

__all__ = ["file_sha256", "load_weights", "weights_sha256"]

_CHECKPOINT_CONTAINERS = ("state_dict", "model", "model_state_dict", "network", "net")
_KEY_PREFIXES = ("module.", "model.", "net.", "network.", "_orig_mod.")


def load_weights(model: nn.Module, path: Path, arch: str, *, allow_pickle: bool = False) -> None:
    """Put a checkpoint's weights into ``model`` (built for ``arch``), every tensor checked: shapes, keys,
    finiteness. A plain state dict, a MONAI bundle ``model.pt``, a Lightning/timm/trainer checkpoint (the
    state dict under ``state_dict``/``model``/… with a ``module.``/``model.``-style prefix), or, with
    ``allow_pickle``, a whole pickled module (its state dict is used).
    """
    obj = load_torch_file(path, "checkpoint", allow_pickle=allow_pickle)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    state = _unwrap_state(obj)
    if state is None:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise BadCheckpoint(
            f"checkpoint {path} holds no state dict (keys: {keys}); save it with torch.save(model.state_dict())"
        )
    state = _strip_prefixes(state, set(model.state_dict()))
    _check_finite(state, path)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        shapes = ", ".join(
            f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})" for k in wrong[:3]
        )
        raise BadCheckpoint(
            f"checkpoint {path} does not fit arch {arch!r}: tensors of other shapes: {shapes}; "
            "check --num-classes (the last layer's outputs) and --arch"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BadCheckpoint(
            f"checkpoint {path} does not fit arch {arch!r}: "
            f"missing keys {_preview(result.missing_keys)}, "
            f"unexpected keys {_preview(result.unexpected_keys)}; "
            "check --arch / num_classes, or the checkpoint file"
        )


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or Inf weights: they give NaN logits, which argmax reads as class 0 and every measure
    as 0 — results that look valid."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise BadCheckpoint(
                f"checkpoint {path} has non-finite weights: {name} holds {count} NaN/Inf value(s) (the first "
                "such tensor); the training diverged or the file is damaged: give a checkpoint of finite weights"
            )


def _unwrap_state(obj: object) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _CHECKPOINT_CONTAINERS:
            if key in obj:
                return _unwrap_state(obj[key])
    return None


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP ``module.``, Lightning ``model.``) until the keys fit; or add the one
    smoothsal's own wrapper has (``model.`` of a torchvision segmentation model seen through ``["out"]``)."""
    while not set(state) & expected:
        prefix = next((p for p in _KEY_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    if not set(state) & expected and expected and all(k.startswith("model.") for k in expected):
        state = {f"model.{k}": v for k, v in state.items()}
    return state


def _preview(keys: list[str], n: int = 6) -> str:
    if not keys:
        return "none"
    more = f" … ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (model checkpoints: a surrogate belongs to one set of weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(checkpoint: str | Path | None) -> str:
    """``random-init`` without a checkpoint (seeded random weights), else the file's sha256."""
    if checkpoint is None:
        return "random-init"
    if not Path(checkpoint).is_file():
        raise MissingInput(f"model checkpoint {checkpoint} does not exist; check --checkpoint")
    return file_sha256(checkpoint)

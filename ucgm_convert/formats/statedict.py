"""Loading state dicts loudly: missing, unexpected and mis-shaped keys are named, never ignored."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import UCGMError


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: nn.Module, state: Mapping[str, Tensor], source: str, assign: bool = False
) -> None:
    """Copy `state` into `module`, raising one UCGMError that names every key problem.

    With assign=True the tensors are adopted instead of copied (a module built on the meta
    device then holds the only copy, e.g. the mmap-ed checkpoint tensors).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    mismatched = [
        f"{k} {list(state[k].shape)} (model expects {list(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        problems.append(f"shape mismatch: {_preview(mismatched)}")
    if problems:
        raise UCGMError(f"{source}: weights do not fit the architecture; " + "; ".join(problems))
    with torch.no_grad():
        module.load_state_dict(dict(state), strict=True, assign=assign)


def state_sha256(model: nn.Module, extra: dict[str, torch.Tensor] | None = None) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor of the state dict, in sorted order."""
    h = hashlib.sha256()
    items = sorted(model.state_dict().items()) + sorted((f"extra.{k}", v) for k, v in (extra or {}).items())
    for name, tensor in items:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

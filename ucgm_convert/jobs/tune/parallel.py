"""How the student and teacher run over processes: alone, DDP, or FSDP2 — behind one small interface.

With DDP every process holds the whole student and optimizer. With FSDP2
(`torch.distributed.fsdp.fully_shard` on each block of `net.blocks`, then on the net) the
student's parameters, gradients and optimizer state are sharded over the processes and the
frozen teacher is sharded the same way (forward only); checkpoints hold full (gathered) weights
and optimizer state in the same format as DDP / one-process runs, so a run can be resumed with or
without FSDP and with any number of processes.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ... import distributed
from ...errors import UCGMError
from ...foundation import DTYPES

Forward = Callable[[Tensor, Tensor, Tensor], Tensor]
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def blocks_of(net: nn.Module) -> nn.ModuleList | nn.Sequential | None:
    """The network's transformer blocks (what activation checkpointing and FSDP wrap), if it has them."""
    blocks = getattr(net, "blocks", None)
    return blocks if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) else None


def checkpoint_blocks(net: nn.Module) -> None:
    """Run every block of net.blocks under activation checkpointing (state-dict keys unchanged)."""
    blocks = blocks_of(net)
    if blocks is None:
        raise UCGMError(f"--grad-checkpointing: the {type(net).__name__} network has no .blocks to checkpoint")
    for block in blocks:
        plain = block.forward

        def forward(self: nn.Module, *args: Any, _plain: Callable[..., Any] = plain, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = types.MethodType(forward, block)


def autocast(module: Forward, device: torch.device, dtype: str) -> Forward:
    """`module` under autocast to `dtype` (float32: `module` itself), returning float32."""
    if DTYPES[dtype] == torch.float32:
        return module

    def fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=DTYPES[dtype]):
            return module(x, t, y).float()

    return fn


def all_ok(ctx: distributed.Context, error: BaseException | None) -> None:
    """Across processes: if any process failed its checks, every process stops."""
    if not ctx.distributed:
        if error is not None:
            raise error
        return
    flag = torch.tensor([1.0 if error is not None else 0.0], device=ctx.device)
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise UCGMError("another process failed its input checks (its message is above)")


def _shard(net: nn.Module, ctx: distributed.Context) -> None:
    """FSDP2: shard each block of net.blocks (when present), then the rest of the net."""
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in blocks_of(net) or ():
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def _shard_optimizer_state(full: dict[str, Any], params: list[nn.Parameter]) -> dict[str, Any]:
    """A full optimizer.state_dict() cut to this process's shards of the (DTensor) params."""

    def shard(value: Any, p: nn.Parameter) -> Any:
        if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
            # every process holds the full value: each keeps its own shard, no communication
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return value

    state = {i: {k: shard(v, params[i]) for k, v in s.items()} for i, s in full["state"].items()}
    return {"state": state, "param_groups": full["param_groups"]}


class Parallel:
    """The student (with its optimizer) and the teacher, placed on one process, DDP or FSDP2.

    `online` is the student's forward for the objective (with gradient through DDP; the
    objective's extra no-grad forwards bypass DDP: no gradient, nothing to sync).
    """

    def __init__(self, ctx: distributed.Context, student: nn.Module, teacher: nn.Module | None,
                 make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 optimizer_state: dict[str, Any] | None, fsdp: bool, dtype: str) -> None:
        self.ctx = ctx
        self.fsdp = fsdp and ctx.distributed
        self.student = student
        params = [p for p in student.parameters() if p.requires_grad]
        if self.fsdp:
            _shard(student.net, ctx)
            if teacher is not None:
                _shard(teacher.net, ctx)
            params = [p for p in student.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = make_optimizer(params)
        if optimizer_state is not None and optimizer_state.get("state"):
            self.optimizer.load_state_dict(_shard_optimizer_state(optimizer_state, params) if self.fsdp
                                           else optimizer_state)
        ddp: nn.Module = student
        if ctx.distributed and not self.fsdp:
            ddp = DistributedDataParallel(student, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        self._ddp = ddp
        grad_forward, plain_forward = autocast(ddp, ctx.device, dtype), autocast(student, ctx.device, dtype)
        self.online: Forward = lambda x, t, y: (grad_forward if torch.is_grad_enabled() else plain_forward)(x, t, y)
        self.teacher: Forward | None = autocast(teacher, ctx.device, dtype) if teacher is not None else None
        self.teacher_module = teacher

    @property
    def mode(self) -> str:
        return "FSDP" if self.fsdp else "DDP" if self.ctx.distributed else "one process"

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        """Sync gradients across processes only on the last micro-batch of a step."""
        if self.fsdp:
            self.student.net.set_requires_gradient_sync(last)
            yield
        elif self.ctx.distributed and not last:
            with self._ddp.no_sync():
                yield
        else:
            yield

    def clip(self, max_norm: float) -> float:
        """Clip the gradients to `max_norm`; the norm before clipping, over all shards."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    def full_student(self) -> dict[str, Tensor] | None:
        """Under FSDP the full student state dict on rank 0 ({} elsewhere; collective), else None."""
        return get_model_state_dict(self.student.net, options=_FULL) if self.fsdp else None

    def full_optimizer(self) -> dict[str, Any]:
        """The full optimizer state in optimizer.state_dict()'s format (under FSDP: collective, rank 0)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        by_name = get_optimizer_state_dict(self.student.net, self.optimizer, options=_FULL)
        if not by_name:
            return {}
        ids: dict[str, int] = {}
        groups = [{**g, "params": [ids.setdefault(name, len(ids)) for name in g["params"]]}
                  for g in by_name["param_groups"]]
        return {"state": {ids[name]: s for name, s in by_name["state"].items()}, "param_groups": groups}

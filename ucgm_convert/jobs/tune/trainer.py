"""One UCGM-T optimizer step: micro-batches, accumulated gradients, clipping, the update and the EMA."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ...errors import UCGMError
from ...model import GenerativeModel
from ...objective import UCGMObjective
from ...settings import TuningSettings
from .data import Dataset, batch_indices, chunk_seed
from .parallel import Parallel


class TuneDiverged(UCGMError):
    """The loss or the gradient norm stopped being finite; the weights were not updated."""


class Trainer:
    """Steps of one process: its chunks of each global batch, the gradient mean over all chunks, the EMA."""

    def __init__(self, data: Dataset, tuning: TuningSettings, objective: UCGMObjective, parallel: Parallel,
                 ema: GenerativeModel, micro: int, accum: int, seed: int) -> None:
        self.data, self.tuning, self.objective, self.parallel, self.ema = data, tuning, objective, parallel, ema
        self.micro, self.accum, self.seed = micro, accum, seed
        ctx = parallel.ctx
        self.chunks_total = ctx.world_size * accum
        self.my_chunks = range(ctx.rank * accum, (ctx.rank + 1) * accum)
        self.skipped = 0

    @property
    def lr(self) -> float:
        return float(self.parallel.optimizer.param_groups[0]["lr"])

    def step(self, step: int) -> tuple[float, float]:
        """Optimizer step `step` (0-based): (mean loss over all chunks, gradient norm before clipping)."""
        parallel, device = self.parallel, self.parallel.ctx.device
        indices = batch_indices(self.data.num_samples, self.tuning.global_batch, self.seed, step)
        chunks = indices.view(self.chunks_total, self.micro)
        parallel.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        shape = tuple(self.ema.latent_shape)
        for m, c in enumerate(self.my_chunks):
            x, y = self.data.get(chunks[c])
            torch.manual_seed(chunk_seed(self.seed, step, c))
            t = self.objective.sample_t(self.micro)
            z = torch.randn((self.micro, *shape))
            x, y, t, z = x.to(device), y.to(device), t.to(device), z.to(device)
            with parallel.accumulate(last=m == self.accum - 1):
                loss = self.objective(parallel.online, x, y, teacher=parallel.teacher, t=t, z=z)
                (loss / self.accum).backward()
            loss_sum += loss.detach().double()
        if parallel.ctx.distributed:
            dist.all_reduce(loss_sum)
        loss_value = float(loss_sum) / self.chunks_total
        grad_norm = parallel.clip(self.tuning.grad_clip)
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else \
                f"gradient norm is {grad_norm} (loss {loss_value:.4g})"
            raise TuneDiverged(f"step {step + 1}: the {what}, not finite; stopped without updating the weights")
        parallel.optimizer.step()
        self._update_ema()
        return loss_value, grad_norm

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA <- lerp(EMA, student, 1 - decay); under FSDP from the gathered full student (rank 0 keeps it)."""
        weight = 1.0 - self.tuning.ema_decay
        if self.parallel.fsdp:
            self._full = self.parallel.full_student()  # collective
            if self.parallel.ctx.is_main:
                for name, p_ema in self.ema.net.named_parameters():
                    p_ema.lerp_(self._full[name].to(p_ema.device), weight)
            return
        for p_ema, p in zip(self.ema.parameters(), self.parallel.student.parameters()):
            p_ema.lerp_(p.detach(), weight)

    def gather(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Under FSDP: the full (student, optimizer) state of the step just taken (collective)."""
        return self._full, self.parallel.full_optimizer()

    def local_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Without FSDP: this process's (student, optimizer) state for a checkpoint."""
        return ({k: v.detach().cpu() for k, v in self.parallel.student.net.state_dict().items()},
                self.parallel.optimizer.state_dict())

"""One UCGM-T optimizer step: micro-batches, accumulated gradients, clipping, the update and the EMA."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ...errors import UCGMError
from ...model import GenerativeModel
from ...nets.blocks import label_dropout_draws
from ...objective import UCGMObjective
from ...settings import TuningSettings
from .data import Dataset, batch_indices, chunk_drops, chunk_seed, label_draws
from .parallel import Parallel


class TuneDiverged(UCGMError):
    """The loss stopped being finite, or too many steps in a row had a non-finite gradient."""


class Trainer:
    """Steps of one process: its chunks of each global batch, the gradient mean over all chunks, the EMA.

    A step whose gradient norm is not finite (with a finite loss) is skipped: no update, no EMA step,
    counted in `skipped`; `max_skipped` such steps in a row stop the run. (The reference zeroes
    non-finite gradient entries and steps anyway; a skip keeps the optimizer moments clean.)
    """

    def __init__(self, data: Dataset, tuning: TuningSettings, objective: UCGMObjective, parallel: Parallel,
                 ema: GenerativeModel, micro: int, accum: int, seed: int, max_skipped: int = 10) -> None:
        self.data, self.tuning, self.objective, self.parallel, self.ema = data, tuning, objective, parallel, ema
        self.micro, self.accum, self.seed, self.max_skipped = micro, accum, seed, max_skipped
        ctx = parallel.ctx
        self.chunks_total = ctx.world_size * accum
        self.my_chunks = range(ctx.rank * accum, (ctx.rank + 1) * accum)
        self.drops = chunk_drops(tuning.global_batch, tuning.drop_group(), tuning.label_drop, micro)
        self.skipped = 0
        self.skipped_in_a_row = 0

    @property
    def lr(self) -> float:
        return float(self.parallel.optimizer.param_groups[0]["lr"])

    def step(self, step: int) -> tuple[float, float]:
        """Optimizer step `step` (0-based): (mean loss over all chunks, gradient norm before clipping)."""
        parallel = self.parallel
        indices = batch_indices(self.data.num_samples, self.tuning.global_batch, self.seed, step)
        chunks = indices.view(self.chunks_total, self.micro)
        draws = label_draws(self.seed, step, self.tuning.global_batch).view(2, self.chunks_total, self.micro)
        parallel.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=parallel.ctx.device, dtype=torch.float64)
        for m, c in enumerate(self.my_chunks):
            teacher = parallel.teacher_module
            with label_dropout_draws(parallel.student, draws[0, c]), \
                    label_dropout_draws(teacher, draws[1, c]) if teacher is not None else contextlib.nullcontext(), \
                    parallel.accumulate(last=m == self.accum - 1):
                loss = self._chunk_loss(step, c, chunks[c])
                (loss / self.accum).backward()
            loss_sum += loss.detach().double()
        if parallel.ctx.distributed:
            dist.all_reduce(loss_sum)
        loss_value = float(loss_sum) / self.chunks_total
        grad_norm = parallel.clip(self.tuning.grad_clip)
        if not math.isfinite(loss_value):
            raise TuneDiverged(f"step {step + 1}: the loss is {loss_value}, not finite; stopped without updating "
                               "the weights")
        if not math.isfinite(grad_norm):
            self.skipped += 1
            self.skipped_in_a_row += 1
            parallel.optimizer.zero_grad(set_to_none=True)
            if self.skipped_in_a_row >= self.max_skipped:
                raise TuneDiverged(f"step {step + 1}: the gradient norm is {grad_norm} (loss {loss_value:.4g}), "
                                   f"not finite for {self.skipped_in_a_row} steps in a row (--max-skipped "
                                   f"{self.max_skipped}); stopped without updating the weights")
            return loss_value, grad_norm
        self.skipped_in_a_row = 0
        parallel.optimizer.step()
        self._update_ema()
        return loss_value, grad_norm

    def _chunk_loss(self, step: int, chunk: int, indices: Tensor) -> Tensor:
        """The loss of micro-batch `chunk`: t and z from chunk_seed, its share of the dropped labels."""
        device = self.parallel.ctx.device
        x, y = self.data.get(indices)
        torch.manual_seed(chunk_seed(self.seed, step, chunk))
        t = self.objective.sample_t(self.micro)
        z = torch.randn((self.micro, *tuple(self.ema.latent_shape)))
        x, y, t, z = x.to(device), y.to(device), t.to(device), z.to(device)
        return self.objective(self.parallel.online, x, y, teacher=self.parallel.teacher, t=t, z=z,
                              ndrop=self.drops[chunk])

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

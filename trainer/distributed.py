"""Data-parallel training through HF accelerate (docs/scaling.md): the processes come from the launcher
(`accelerate launch` or `torchrun`), the process group and the collectives from accelerate's `PartialState`
and `accelerate.utils.reduce`; nothing here starts processes or opens sockets.

What data parallelism means for the loop (trainer/loop.py):
- global batch = per-process `batch_size` x processes: every rank draws the same global micro-batch from the
  seeded order and trains on its own contiguous block of rows, so N processes at batch b see exactly the rows of
  one process at batch N*b;
- after backward, the trainable tensors' gradients are averaged across ranks in one all-reduce (flattened), so
  every rank clips and steps identically and the weights never drift apart. The model is not wrapped in
  `DistributedDataParallel`: the trained tensors are not all in the model (`train-e2e` trains the SAE, which
  sits outside it), and the objective runs partial forwards (the shared prefix) that DDP's reducer does not
  expect. The arithmetic is DDP's (mean of per-rank gradients); only the overlap with backward is given up,
  which is small for LoRA-sized gradients;
- logged losses, step times and eval sums are reduced, so every rank takes the same budget and eval decisions;
  eval batches of `batch_size` rows are dealt to ranks whole, so the eval is exactly that of one process at the
  same `batch_size` (FVU divides by the variance around each batch's mean, so it depends on the eval batch);
- only rank 0 writes (config, metrics, checkpoints, bundle, plots).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch

log = logging.getLogger(__name__)


def launched() -> bool:
    """True inside a multi-process launch (`accelerate launch`, `torchrun`): WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the run: rank, number of processes, and the device the launcher gave it."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # the launcher's device for this rank (None: the config's device)

    @classmethod
    def from_launch(cls, device: str | None) -> DataParallel:
        """The process group the launcher set up, through accelerate; a single process when not launched.

        `device`: the run's `--device`. CPU runs (or machines without CUDA) use gloo; GPU runs take the device
        of their local rank (NCCL), whatever `--device` said beyond "cuda"."""
        if not launched():
            return cls()
        from accelerate import PartialState

        cpu = device == "cpu" or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)  # cpu=True: accelerate's MULTI_CPU (gloo) under a torchrun-style launch
        dev = "cpu" if cpu else str(state.device)
        log.info("data parallel: rank %d of %d on %s (%s)", state.process_index, state.num_processes, dev,
                 state.backend)
        return cls(state.process_index, state.num_processes, dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of a global batch of `world * b` rows."""
        b = len(rows) // self.world
        return rows[self.rank * b:(self.rank + 1) * b]

    def eval_rows(self, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's share of the validation rows: whole eval batches, dealt round-robin, so every batch is the
        one a single process forms (the FVU's per-batch means included) and the reduced sums are its sums."""
        mine = rows.split(batch_size)[self.rank::self.world]
        if not mine:
            raise ValueError(f"{len(rows)} validation rows make fewer batches of {batch_size} than the "
                             f"{self.world} processes")
        return torch.cat(mine)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over ranks (a copy of `t` in one process)."""
        if self.world == 1:
            return t.clone()
        from accelerate.utils import reduce

        return reduce(t, reduction="sum")

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over ranks (one all-reduce of the flattened gradients)."""
        if self.world == 1:
            return
        with_grad = [p for p in params if p.grad is not None]
        flat = self.mean(torch.cat([p.grad.reshape(-1) for p in with_grad]))
        i = 0
        for p in with_grad:
            n = p.grad.numel()
            p.grad.copy_(flat[i:i + n].view_as(p.grad))
            i += n

    def gather_bytes(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor (for the per-rank RNG states in a checkpoint)."""
        if self.world == 1:
            return [t]
        from accelerate.utils import gather

        return [row.clone() for row in gather(t.unsqueeze(0)).unbind(0)]  # own storage each (see loop.py)

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

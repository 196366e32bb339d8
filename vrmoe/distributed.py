"""Data parallelism under ``torchrun``: one process per device, rank 0 the only writer.

``torchrun --standalone --nproc_per_node=N -m vrmoe train [overrides]`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`start` joins the process group (gloo on CPU,
NCCL for CUDA tensors) before Hydra composes, and fixes the launch time from rank 0 so
every rank resolves the same run dir. ``train.batch_size`` stays the global batch: each
rank takes its contiguous slice of the batch one process would draw at that step, the
gradients of the equal-sized slices are averaged by DistributedDataParallel, so the
update is the single-process one. Logged numbers are averaged over ranks; only rank 0
writes records, figures, checkpoints and W&B.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError

# A rank that waits longer than this for the others (one of them died) gives up with an error.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
LAUNCH_TIME_ENV = "VRMOE_LAUNCH_TIME"


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, n: int) -> slice:
        """This rank's contiguous block of ``n`` items (the first ranks take one more when uneven):
        concatenated in rank order, the blocks are the items in their order."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (``n`` divisible by the world size)."""
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)


def env() -> DistEnv:
    """What torchrun told this process (one process, rank 0, when it did not run it)."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def start() -> DistEnv:
    """Join the process group (when launched by torchrun) and agree on the launch time."""
    here = env()
    if not here.enabled or dist.is_initialized():
        return here
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    launch = [datetime.now().isoformat() if here.is_main else None]
    dist.broadcast_object_list(launch, src=0)
    os.environ[LAUNCH_TIME_ENV] = launch[0]
    # torchrun stops the other ranks with SIGTERM when one fails or the launcher is interrupted:
    # turn it into the interrupt the loop already handles (checkpoint, status), not a silent kill.
    signal.signal(signal.SIGTERM, _interrupt)
    return here


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def start_in_job() -> DistEnv:
    """In a job that a Slurm or submitit launcher started as several tasks (a multi-GPU sweep job):
    the tasks' ranks come from submitit, then the process group as under torchrun."""
    if "RANK" not in os.environ:
        try:
            import submitit

            tasks = submitit.JobEnvironment().num_tasks
        except Exception:  # not a submitit job
            return env()
        if tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return start()


def launch_time() -> datetime:
    """The time the run dir is named after: rank 0's under torchrun, this process's otherwise."""
    stamp = os.environ.get(LAUNCH_TIME_ENV)
    return datetime.fromisoformat(stamp) if stamp else datetime.now()


def device_for(here: DistEnv, device: torch.device) -> torch.device:
    """One device per rank: ``cuda:<local rank>`` when training on CUDA."""
    if not here.enabled or device.type != "cuda":
        return device
    if here.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"torchrun started {here.world_size} processes on this node but it has "
                          f"{torch.cuda.device_count()} CUDA device(s); use --nproc_per_node <= "
                          f"{torch.cuda.device_count()}")
    torch.cuda.set_device(here.local_rank)
    return torch.device("cuda", here.local_rank)


def check_batch(here: DistEnv, batch_size: int) -> None:
    if batch_size % here.world_size:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must divide evenly over "
                          f"{here.world_size} ranks; use a multiple of {here.world_size}")


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ranks (in place; unchanged in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` in one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def wrap(model: torch.nn.Module, here: DistEnv, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when there are several ranks: only trainable
    parameters carry gradients, so a post-hoc run all-reduces its heads alone."""
    if not here.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

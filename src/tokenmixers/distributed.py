"""Distributed set-up for torchrun and SLURM, and BatchNorm statistics over the global batch.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; under SLURM (``srun``) the same command reads
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and takes the first host of the job as the rendezvous
address when MASTER_ADDR is not set. NCCL is used on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from timm.utils import init_distributed_device
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

T = TypeVar("T")


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0


def _slurm_master_addr() -> None:
    """Point MASTER_ADDR/PORT at the job's first node when running under srun without torchrun."""
    if "SLURM_PROCID" not in os.environ or "MASTER_ADDR" in os.environ:
        return
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    host = None
    if nodelist and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        host = out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else None
    os.environ["MASTER_ADDR"] = host or os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def is_primary() -> bool:
    """Whether this is process 0 of the job: of the process group, else of a torchrun / SLURM launch, else alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def launched_processes() -> int:
    """How many processes the launcher (torchrun / srun) started for this job."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def check_device(device: str) -> str:
    """Resolve ``auto`` (cuda if available, else cpu) and refuse a device this machine does not have."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was asked for but this machine has no usable CUDA GPU (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use device=cpu, or device=auto to take a GPU when there is one"
            )
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group if launched by torchrun/SLURM; pick this process's device."""
    device = check_device(device)
    _slurm_master_addr()
    if dist.is_initialized():
        info = SimpleNamespace(device=device, rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                               world_size=dist.get_world_size())
        if device.startswith("cuda") and info.world_size > 1:
            info.device = f"cuda:{info.local_rank}"
    else:
        info = SimpleNamespace(device=device)
        init_distributed_device(info)  # fills rank, local_rank, world_size and this process's device
    return DistInfo(torch.device(info.device), info.rank, info.local_rank, info.world_size)


def on_primary(fn: Callable[[], T]) -> T:
    """Run ``fn`` on process 0 only; an error it raises is raised on every process (none waits forever)."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    result, error = None, None
    if not distributed or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, on every process
            error = err
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = error or box[0]
    if error is not None:
        raise error
    return result


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (identity when not distributed); the result stays on its device."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL reduces only CUDA tensors, gloo any: counters kept on the CPU travel through the GPU
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
        reduced = tensor.to(on, copy=True)
        dist.all_reduce(reduced)
        tensor = reduced.to(tensor.device)
    return tensor


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@atexit.register
def _leave_process_group() -> None:
    """At exit, tear the process group down while the interpreter is still whole.

    Left to interpreter teardown, the group's C++ threads can be destroyed while still joinable, which aborts
    the process ("terminate called without an active exception", SIGABRT) after its work is done.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# torch has no public base class for BatchNorm of any rank; _BatchNorm is what its own SyncBatchNorm extends
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span every process, on any backend (CPU/gloo too).

    ``torch.nn.SyncBatchNorm`` needs a GPU; this does the same with one autograd-aware all-reduce
    of per-channel sums, so a run on N processes normalises exactly like one process with the
    whole batch.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (B, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``(B, C, ...)`` with global-batch statistics in training."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        C = x.shape[1]
        xf = x.float()
        dims = [0] + list(range(2, x.dim()))
        shape = [1, C] + [1] * (x.dim() - 2)
        count = torch.full((1,), xf.numel() / C, dtype=torch.float32, device=x.device)
        stats = differentiable_all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C : 2 * C] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), momentum)
        scale = torch.rsqrt(var + self.eps) * self.weight
        y = (xf - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Global-batch BatchNorm: torch's SyncBatchNorm on CUDA, :class:`GlobalBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new.to(child.weight.device))
        else:
            convert_batchnorm(child, device)
    return model

"""Process groups: torch.distributed, megatron-core's ``parallel_state``, and DeepSpeed on top of them.

On a machine without CUDA everything runs over gloo with DeepSpeed's CPU accelerator
(``DS_ACCELERATOR=cpu``); ``cpu_shims`` holds the few patches that needs (DESIGN.md §4).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from pretrain.parallel.layout import ParallelLayout


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("HGRN2_FORCE_CPU") != "1"


def device() -> torch.device:
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def prepare_environment() -> None:
    """Environment DeepSpeed reads at import: the CPU accelerator when there is no GPU."""
    if not use_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from pretrain.parallel.cpu_shims import apply_deepspeed_cpu_shims, apply_megatron_cpu_shims

        apply_deepspeed_cpu_shims()
        apply_megatron_cpu_shims()


def init_process_group(timeout_s: float = 600.0) -> None:
    """torch.distributed from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed training needs {', '.join(missing)} in the environment: start it with torchrun or the "
            "scripts in launch/ (see docs/launch.md)"
        )
    if use_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def init_deepspeed_comm() -> None:
    """DeepSpeed's communication layer over the torch process group (its pipeline module needs it)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


def init_model_parallel(layout: ParallelLayout) -> None:
    """megatron-core's TP/PP/DP groups (rank order tp-dp-pp, the same as DeepSpeed's pipe topology)."""
    from megatron.core import parallel_state

    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"world size {dist.get_world_size()} does not match the layout {layout.describe()}")
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == layout.tensor
            and parallel_state.get_pipeline_model_parallel_world_size() == layout.pipeline
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline
    )


class MegatronMPU:
    """The interface ``deepspeed.initialize(mpu=...)`` expects, over megatron-core's ``parallel_state``.

    DeepSpeed asks for ``get_model_parallel_*`` (absent from parallel_state) besides the data-parallel and
    tensor-parallel getters; model parallel here is the tensor-parallel group (no PP on this path).
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()


_cleanup_registered = False


def register_exit_cleanup() -> None:
    """Tear the process group down before interpreter exit (gloo threads at teardown rarely abort)."""
    global _cleanup_registered
    if _cleanup_registered:
        return
    _cleanup_registered = True
    import atexit

    def cleanup() -> None:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass

    atexit.register(cleanup)


def finish_worker(code: int = 0) -> None:
    """Barrier, flush, ``os._exit``: dodges the rare abort at interpreter exit seen with gloo (DESIGN §4)."""
    import sys

    try:
        if dist.is_initialized():
            dist.barrier()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

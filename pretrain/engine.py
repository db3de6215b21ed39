"""The seam between the training loop and whatever executes a step: ``TrainingEngine``.

The loop (``pretrain.train``) only ever talks to an engine:

    engine = build_engine(cfg, model_config)       # LocalEngine, or pretrain.parallel's engine
    stats = engine.train_step(micro_batches)        # one optimizer step over this rank's micro-batches
    loss_sum, tokens = engine.eval_loss(batch)      # summed token losses of one batch, no grad
    loss_sum, tokens = engine.reduce_sum([loss_sum, tokens])   # over data-parallel ranks
    engine.save(directory) / engine.load(directory)  # model + optimizer, layout-independent files
    engine.iteration                                # optimizer steps taken (skipped ones included)

Contract of ``train_step(micro_batches: list[Batch]) -> StepStats``:
- forward/backward over every micro-batch with gradient accumulation; the loss is the token mean over
  the whole global batch (all micro-batches of all data-parallel ranks): each micro-batch contributes
  ``sum(token losses) / global_tokens``;
- the learning rate is ``pretrain.schedule.lr_at(iteration, ...)``; ``iteration`` then advances by one,
  also when the step is skipped (the schedule follows the data, which has been consumed);
- if the loss or the gradient norm is not finite, the gradients are dropped and neither the weights
  nor the optimizer state change (``StepStats.skipped``); otherwise the gradients are clipped to
  ``optimizer.grad_clip`` (global norm; 0: no clipping) and AdamW steps.

Data parallelism: the loop cuts each global batch (``batch.global_batch_size`` samples, in the order
of the sample index from ``consumed_samples``) into ``dp_size`` contiguous slices and gives this rank
slice ``dp_rank``; ``LocalEngine`` has ``dp_rank`` 0 and ``dp_size`` 1. Only ``is_main`` writes logs,
TensorBoard and checkpoint files; ``barrier()`` separates the phases of a checkpoint write.

Checkpoint files written by ``save`` (single-process names, full fp32 tensors, any layout reads them):
``model_config.json`` + ``model.safetensors`` (exactly ``hgrn2.save_checkpoint``) and
``optimizer.safetensors`` with ``exp_avg.<param>``, ``exp_avg_sq.<param>``, ``step.<param>`` per
parameter (``<param>`` as in ``model.named_parameters()`` of ``hgrn2.HGRN2LM``). A distributed engine
gathers to the main rank and writes the same files. The loop adds ``trainer_state.json``,
``rng.safetensors``, ``config.yaml`` and ``tokenizer.model`` (``pretrain.checkpoint``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hgrn2.checkpoint import WEIGHTS_FILE, load_model_weights, save_checkpoint
from hgrn2.config import HGRN2Config
from hgrn2.fused import IGNORE_INDEX
from hgrn2.model import HGRN2LM
from pretrain.config import TrainConfig
from pretrain.schedule import lr_at

OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class Batch:
    """One micro-batch. ``labels`` are ``input_ids`` shifted by one (``IGNORE_INDEX`` where none).

    With ``cu_seqlens`` ([N + 1] int32 document boundaries) the rows are packed into one: ``input_ids``
    and ``labels`` are [1, B*T] and the recurrent state resets at every boundary.
    """

    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64
    cu_seqlens: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=True)
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True), cu)

    def token_count(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class StepStats:
    loss: float  # token-mean loss over the global batch (inf/nan when the step was skipped for it)
    grad_norm: float  # global gradient norm before clipping
    skipped: bool  # non-finite loss or gradient: the weights did not change
    lr: float  # the learning rate of this step
    tokens: int  # tokens in the global batch


@runtime_checkable
class TrainingEngine(Protocol):
    model: nn.Module
    device: torch.device
    dp_rank: int
    dp_size: int
    is_main: bool
    iteration: int

    def train_step(self, micro_batches: list[Batch]) -> StepStats: ...

    def eval_loss(self, batch: Batch) -> tuple[float, int]: ...

    def reduce_sum(self, values: list[float]) -> list[float]: ...

    def barrier(self) -> None: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


# ---------------------------------------------------------------------------------------------------
# Pieces shared with distributed engines


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but no CUDA device is available (use run.device=auto or cpu)")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``auto``; fp32 (no autocast) on the CPU for ``auto``."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def no_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Norm weights, biases and the lower bounds Γ are not decayed (Γ is 2-D, so named explicitly)."""
    module = name.rsplit(".", 2)[-2] if name.count(".") else ""
    return parameter.dim() < 2 or name.endswith(".bias") or name.endswith("lower_bounds") or module.endswith("norm")


def parameter_groups(named_parameters: Iterator[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            (plain if no_weight_decay(name, parameter) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    opt = cfg.optimizer
    groups = parameter_groups(model.named_parameters(), opt.weight_decay)
    # The fused CUDA kernel is the fastest AdamW there; on the CPU the default (foreach) is exact and fast.
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=device.type == "cuda")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (fp32) over the labelled tokens."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def model_loss_sum(model, batch: Batch, loss_chunk_tokens: int) -> torch.Tensor:
    """The model's summed token loss on a batch: over materialised logits, or fused in chunks of tokens."""
    if loss_chunk_tokens:
        return model(batch.input_ids, cu_seqlens=batch.cu_seqlens, labels=batch.labels,
                     loss_chunk_rows=loss_chunk_tokens)
    return token_loss_sum(model(batch.input_ids, cu_seqlens=batch.cu_seqlens), batch.labels)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """AdamW state as ``{exp_avg.<name>, exp_avg_sq.<name>, step.<name>}`` (contiguous, on the CPU)."""
    tensors = {}
    for parameter, state in optimizer.state.items():
        name = names[parameter]
        for key in OPTIMIZER_STATE_KEYS:
            value = state[key]
            value = value if torch.is_tensor(value) else torch.tensor(float(value))
            tensors[f"{key}.{name}"] = value.detach().to("cpu").contiguous()
    return tensors


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str], tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Restore what ``optimizer_tensors`` wrote; a missing or mis-shaped tensor is an error naming it."""
    expected = {f"{k}.{n}" for n in names.values() for k in OPTIMIZER_STATE_KEYS}
    if not tensors:
        return  # saved before the first optimizer step: AdamW has no state yet
    problems = [f"missing {key!r}" for key in sorted(expected - set(tensors))]
    problems += [f"unexpected {key!r}" for key in sorted(set(tensors) - expected)]
    if problems:
        raise ValueError(f"{source} does not match the model's parameters: " + "; ".join(problems[:10]))
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for parameter in group["params"]:
            name = names[parameter]
            state = {}
            for key in ("exp_avg", "exp_avg_sq"):
                value = tensors[f"{key}.{name}"]
                if value.shape != parameter.shape:
                    raise ValueError(f"{source}: {key}.{name} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(parameter.shape)}")
                state[key] = value.to(device=parameter.device, dtype=parameter.dtype).clone()
            step = tensors[f"step.{name}"].to(torch.float32)
            state["step"] = step.to(parameter.device) if on_device else step.clone()
            optimizer.state[parameter] = state


# ---------------------------------------------------------------------------------------------------
# The single-process engine


class LocalEngine:
    """One process, plain torch: CPU (fp32) or one GPU (bf16 autocast)."""

    dp_rank = 0
    dp_size = 1
    is_main = True

    def __init__(self, cfg: TrainConfig, model_config: HGRN2Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.run.device)
        self.model = HGRN2LM(model_config).to(self.device)
        self.model.activation_checkpointing = cfg.run.activation_checkpointing
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.names = {parameter: name for name, parameter in self.model.named_parameters()}
        self.iteration = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.cfg.run.precision, self.device)

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            return model_loss_sum(self.model, batch, self.cfg.run.loss_chunk_tokens)

    def current_lr(self) -> float:
        return lr_at(self.iteration, self.cfg.optimizer.lr, self.cfg.run.steps, self.cfg.schedule)

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        self.model.train()
        batches = [batch.to(self.device) for batch in micro_batches]
        tokens = sum(batch.token_count() for batch in batches)
        if tokens == 0:
            raise ValueError("a global batch has no labelled tokens")
        total = torch.zeros((), device=self.device)
        for batch in batches:
            loss = self._loss_sum(batch) / tokens
            loss.backward()
            total += loss.detach()
        lr = self.current_lr()
        self.iteration += 1
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        loss_value, norm_value = total.item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepStats(loss_value, norm_value, True, lr, tokens)
        if self.cfg.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(parameters, self.cfg.optimizer.grad_clip, grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss_value, norm_value, False, lr, tokens)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        self.model.eval()
        batch = batch.to(self.device)
        return self._loss_sum(batch).item(), batch.token_count()

    def reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def barrier(self) -> None:
        pass

    def save(self, directory: Path) -> None:
        save_checkpoint(self.model, directory)
        tensors = optimizer_tensors(self.optimizer, self.names)
        save_file(tensors, str(Path(directory) / OPTIMIZER_FILE), metadata={"format": "pt"})

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        weights = directory / WEIGHTS_FILE
        load_model_weights(self.model, load_file(str(weights), device=str(self.device)), str(weights))
        optimizer_file = directory / OPTIMIZER_FILE
        if not optimizer_file.is_file():
            raise FileNotFoundError(f"{directory} has no {OPTIMIZER_FILE}: not a training checkpoint")
        load_optimizer_tensors(self.optimizer, self.names, load_file(str(optimizer_file)), str(optimizer_file))


def is_single_process(cfg: TrainConfig) -> bool:
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return p.tensor == 1 and p.pipeline == 1 and p.zero_stage == 0 and not p.sequence_parallel and world == 1


def build_engine(cfg: TrainConfig, model_config: HGRN2Config) -> TrainingEngine:
    """``LocalEngine`` for one process; otherwise ``pretrain.parallel.build_engine(cfg, model_config)``.

    Call it after seeding torch (``torch.manual_seed(cfg.run.seed)``): the engine builds the model, and
    every engine must initialise it as ``HGRN2LM(model_config)`` would on one process.
    """
    if is_single_process(cfg):
        return LocalEngine(cfg, model_config)
    try:
        from pretrain.parallel import build_engine as build_parallel_engine
    except ImportError as error:
        raise RuntimeError(
            f"parallel sizes {cfg.parallel} (WORLD_SIZE={os.environ.get('WORLD_SIZE', '1')}) need "
            f"pretrain.parallel, which could not be imported: {error}"
        ) from error
    return build_parallel_engine(cfg, model_config)

"""``ParallelEngine``: the ``TrainingEngine`` (``pretrain.engine``) for TP × PP × DP layouts.

- Without PP: the plain ``HGRN2LM``, sharded by ``apply_tensor_parallel`` (megatron-core layers; with
  ``parallel.sequence_parallel`` also sequence-sharded between the mixers), inside a DeepSpeed engine with
  ZeRO 1, 2 or 3 over the data-parallel group (``mpu`` = megatron's groups).
- With PP: DeepSpeed's pipeline engine (1F1B, ``train_batch``) over ``pipeline.build_pipeline_module``
  with ZeRO-1.

The optimizer is torch's AdamW with the single-process parameter groups (``pretrain.engine``), handed to
DeepSpeed as a client optimizer. ZeRO-0 is run as ZeRO-1 (same arithmetic; DeepSpeed's ZeRO optimizer
is what skips non-finite steps), so every layout has the same skip semantics.

Loss: each micro-batch contributes ``sum(token losses) / global_tokens``; DeepSpeed divides by the
accumulation steps and averages over DP, so the backward loss is scaled by ``GAS · DP / global_tokens``
and the gradients equal the single-process ones.

Checkpoints are layout-independent (``pretrain.engine``'s format): full fp32 weights and AdamW moments
gathered with ``deepspeed.utils.safe_get_full_*`` (ZeRO), all-gathered along the TP partition dim
(vocabulary padding stripped) and collected from every pipeline stage onto the main rank.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from hgrn2.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model_weights, write_json_atomic
from hgrn2.config import HGRN2Config
from hgrn2.model import HGRN2LM
from pretrain.engine import (
    OPTIMIZER_FILE,
    Batch,
    StepStats,
    parameter_groups,
)
from pretrain.parallel import distributed as pdist
from pretrain.parallel import zero_norms
from pretrain.parallel.layout import ParallelLayout, layout_from_config
from pretrain.parallel.tensor_parallel import (
    apply_tensor_parallel,
    gather_tensor_parallel,
    lm_loss_sum,
    shard_tensor,
)
from pretrain.schedule import lr_at

VOCAB_PARAMS = ("embeddings.weight", "lm_head.weight")


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def zero_config(parallel, stage: int) -> dict:
    config = {"stage": stage, "reduce_bucket_size": parallel.zero_bucket_size}
    if stage < 3:  # stage 3 gathers parameters by its own prefetch settings
        config["allgather_bucket_size"] = parallel.zero_bucket_size
    if parallel.zero_overlap_comm is not None:
        config["overlap_comm"] = parallel.zero_overlap_comm
    return config


def client_adamw(named_parameters, opt, device: torch.device) -> torch.optim.AdamW:
    """The optimizer DeepSpeed wraps: the single-process parameter groups, and on CUDA torch's fused AdamW
    kernel, as ``LocalEngine`` takes: the default foreach AdamW makes ~10 passes over ZeRO's flat fp32
    partitions, an estimated 5 ms a step at 385m on one H200 (not yet timed; docs/next-steps.md)."""
    return torch.optim.AdamW(parameter_groups(named_parameters, opt.weight_decay), lr=opt.lr,
                             betas=tuple(opt.betas), eps=opt.eps, fused=device.type == "cuda")


def deepspeed_config(cfg, layout: ParallelLayout, gas: int, bf16: bool) -> dict:
    zero_stage = max(layout.zero_stage, 1)
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.batch.micro_batch_size * gas * layout.data,
        "zero_optimization": zero_config(cfg.parallel, zero_stage),
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        # small tensors stay unpartitioned below this many elements; keep the default behaviour explicit
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if cfg.optimizer.grad_clip > 0:
        config["gradient_clipping"] = cfg.optimizer.grad_clip
    if layout.pipeline > 1 and layout.tensor > 1:
        # send whole activations between stages (each TP rank to its peer), not TP-partitioned ones
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return config


class ParallelEngine:
    """TP/PP/DP training engine with DeepSpeed ZeRO; see the module docstring."""

    def __init__(self, cfg, model_config: HGRN2Config, layout: ParallelLayout | None = None) -> None:
        # the caller seeded torch: the model must be initialised as HGRN2LM(model_config) on one process,
        # whatever the set-up below draws
        rng = torch.get_rng_state()
        if cfg.run.device == "cpu":
            os.environ["HGRN2_FORCE_CPU"] = "1"  # gloo and DeepSpeed's CPU accelerator even where CUDA exists
        elif cfg.run.device == "cuda" and not pdist.use_cuda():
            raise RuntimeError("run.device is 'cuda' but no CUDA device is available (use run.device=auto or cpu)")
        pdist.prepare_environment()
        pdist.init_process_group()
        pdist.register_exit_cleanup()
        self.layout = layout or layout_from_config(cfg, dist.get_world_size(), model_config)
        pdist.init_model_parallel(self.layout)
        pdist.init_deepspeed_comm()
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.cfg = cfg
        self.model_config = model_config
        self.device = pdist.device()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.is_main = dist.get_rank() == 0
        self.iteration = 0
        samples_per_rank, remainder = divmod(cfg.batch.global_batch_size, self.dp_size)
        if remainder or samples_per_rank % cfg.batch.micro_batch_size:
            raise ValueError(
                f"batch.global_batch_size ({cfg.batch.global_batch_size}) must be a multiple of data-parallel "
                f"size ({self.dp_size}) × batch.micro_batch_size ({cfg.batch.micro_batch_size})"
            )
        self.gas = samples_per_rank // cfg.batch.micro_batch_size
        self.bf16 = use_bf16(cfg.run.precision, self.device)
        self.grad_hook = None  # tests: called with the engine right before the optimizer step
        self._loss_scale = 1.0
        self._loss_sums: list[torch.Tensor] = []
        self._eval = False
        self.engine = None
        self._cpu_group = None
        torch.set_rng_state(rng)
        self._build(HGRN2LM(model_config))

    # -----------------------------------------------------------------------------------------------
    # construction

    def _loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, _ = lm_loss_sum(logits, labels, self.tp_size)
        return self._scaled_loss(total)

    def _scaled_loss(self, total: torch.Tensor) -> torch.Tensor:
        if self._eval:
            return total
        self._loss_sums.append(total.detach())
        return total * self._loss_scale

    def _batch_loss(self, batch: Batch) -> torch.Tensor:
        """The micro-batch's (scaled) loss through the DeepSpeed engine, without pipeline parallelism."""
        chunk = self.cfg.run.loss_chunk_tokens
        if chunk:  # the LM head and the loss fused inside the model's forward (TP = 1, ZeRO <= 2: checked)
            total = self.engine(batch.input_ids, cu_seqlens=batch.cu_seqlens, labels=batch.labels,
                                loss_chunk_rows=chunk)
            return self._scaled_loss(total)
        return self._loss_fn(self.engine(batch.input_ids, cu_seqlens=batch.cu_seqlens), batch.labels)

    def _build(self, model: HGRN2LM) -> None:
        import deepspeed

        if self.engine is not None:
            destroy = getattr(self.engine, "destroy", None)
            if destroy is not None:
                destroy()
            self.engine = None
        model.activation_checkpointing = self.cfg.run.activation_checkpointing
        opt = self.cfg.optimizer
        ds_config = deepspeed_config(self.cfg, self.layout, self.gas, self.bf16)
        if self.pp_size > 1:
            from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

            from pretrain.parallel.pipeline import BlockStage, build_pipeline_module, canonical_names

            topology = None
            if self.tp_size > 1:
                apply_tensor_parallel(model)
                self.vocab_padded = model.tensor_parallel["vocab_padded"]
                # pipe-data-model rank order, the same as megatron's tp-dp-pp groups
                topology = PipeModelDataParallelTopology(num_pp=self.pp_size, num_mp=self.tp_size, num_dp=self.dp_size)
            module, self.stage_blocks = build_pipeline_module(model, self.pp_size, self._loss_fn, topology=topology)
            for layer in module.forward_funcs:
                if isinstance(layer, BlockStage):
                    layer.activation_checkpointing = self.cfg.run.activation_checkpointing
            self.names = canonical_names(module, model)
            named = [(name, p) for p, name in self.names.items()]
            optimizer = client_adamw(iter(named), opt, self.device)
            self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        else:
            apply_tensor_parallel(model, sequence_parallel=self.layout.sequence_parallel)
            self.vocab_padded = getattr(model, "tensor_parallel", {}).get("vocab_padded")
            self.names = {p: name for name, p in model.named_parameters()}
            optimizer = client_adamw(model.named_parameters(), opt, self.device)
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=ds_config, mpu=pdist.MegatronMPU()
            )
        self.model = self.engine.module
        zero_opt = self.engine.optimizer
        if self.cfg.parallel.zero_multi_tensor_checks:
            zero_norms.install(zero_opt)
        original_step = zero_opt.step

        def step_with_hook(*args, **kwargs):
            if self.grad_hook is not None:
                self.grad_hook(self)
            return original_step(*args, **kwargs)

        zero_opt.step = step_with_hook

    # -----------------------------------------------------------------------------------------------
    # training

    def current_lr(self) -> float:
        return lr_at(self.iteration, self.cfg.optimizer.lr, self.cfg.run.steps, self.cfg.schedule)

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(torch.float64).cpu() if self.device.type != "cuda" else value.double()
        dist.all_reduce(value, group=self.ps.get_data_parallel_group())
        return value

    def _check_sequence_parallel(self, batch: Batch) -> None:
        """SP shards every sequence over the TP group; refuse what it cannot shard with what to change."""
        if not self.layout.sequence_parallel:
            return
        if batch.cu_seqlens is not None:
            raise ValueError(
                "packed batches with document resets (data.reset_at_eod) are not supported with sequence "
                "parallelism; set data.reset_at_eod=false or parallel.sequence_parallel=false"
            )
        length = batch.input_ids.shape[1]
        if length % self.tp_size:
            raise ValueError(
                f"a batch of sequence length {length} is not divisible by parallel.tensor={self.tp_size}, which "
                "sequence parallelism needs: set batch.seq_length to a multiple of parallel.tensor, or set "
                "parallel.sequence_parallel=false"
            )

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        if len(micro_batches) != self.gas:
            raise ValueError(
                f"train_step got {len(micro_batches)} micro-batches; this layout takes {self.gas} per rank "
                f"(global batch {self.cfg.batch.global_batch_size} / DP {self.dp_size} / micro-batch "
                f"{self.cfg.batch.micro_batch_size})"
            )
        batches = [batch.to(self.device) for batch in micro_batches]
        for batch in batches:
            self._check_sequence_parallel(batch)
        local_tokens = sum(batch.token_count() for batch in batches)
        global_tokens = int(self._dp_sum(torch.tensor(float(local_tokens), device=self.device)).item())
        if global_tokens == 0:
            raise ValueError("a global batch has no labelled tokens")
        lr = self.current_lr()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self._loss_scale = self.gas * self.dp_size / global_tokens
        self._loss_sums = []
        skipped_before = self.engine.skipped_steps
        self._eval = False
        if self.pp_size > 1:
            if any(batch.cu_seqlens is not None for batch in batches):
                raise ValueError(
                    "packed batches with document resets (data.reset_at_eod) are not supported with pipeline "
                    "parallelism; set data.reset_at_eod=false or parallel.pipeline=1"
                )
            self.engine.train_batch(iter([(batch.input_ids, batch.labels) for batch in batches]))
            local = torch.stack(self._loss_sums).sum() if self._loss_sums else torch.zeros((), device=self.device)
            # only the last stage computed losses: sum over the whole world, counting TP rank 0 only
            total = local.detach().double() * (1.0 if self.tp_rank == 0 else 0.0)
            dist.all_reduce(total)
        else:
            self.engine.train()
            for batch in batches:
                loss = self._batch_loss(batch)
                self.engine.backward(loss)
                self.engine.step()
            total = self._dp_sum(torch.stack(self._loss_sums).sum())
        self.iteration += 1
        loss_value = float(total.item()) / global_tokens
        norm = self.engine.get_global_grad_norm()
        norm_value = float(norm.item() if torch.is_tensor(norm) else (norm if norm is not None else float("nan")))
        skipped = self.engine.skipped_steps != skipped_before or not math.isfinite(loss_value)
        return StepStats(loss_value, norm_value, skipped, lr, global_tokens)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        batch = batch.to(self.device)
        self._check_sequence_parallel(batch)
        tokens = batch.token_count()
        self._eval = True
        try:
            if self.pp_size > 1:
                value = self.engine.eval_batch(
                    iter([(batch.input_ids, batch.labels)]), num_micro_batches=1, reduce_output="avg"
                )
                return float(value.item() if torch.is_tensor(value) else value), tokens
            self.engine.eval()
            return float(self._batch_loss(batch).item()), tokens
        finally:
            self._eval = False

    def reduce_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.ps.get_data_parallel_group())
        return tensor.tolist()

    def barrier(self) -> None:
        dist.barrier()

    # -----------------------------------------------------------------------------------------------
    # full tensors (layout-independent)

    def _gather_full(self, fetch) -> dict[str, torch.Tensor] | None:
        """``{single-process name: full fp32 tensor}`` on the main rank (None elsewhere).

        ``fetch(param)`` returns this TP rank's full (ZeRO-gathered) tensor of ``param``; it is a collective
        over the DP group, so every rank walks its parameters in the same (sorted) order.
        """
        local = {}
        tp_group = self.ps.get_tensor_model_parallel_group()
        for param, name in sorted(self.names.items(), key=lambda item: item[1]):
            value = fetch(param)
            if value is None:
                continue
            if self.tp_size > 1 and getattr(param, "tensor_model_parallel", False):
                value = gather_tensor_parallel(value, param.partition_dim, tp_group, self.tp_size)
                if name in VOCAB_PARAMS:
                    value = value[: self.model_config.vocab_size]
            if self.dp_rank == 0 and self.tp_rank == 0:
                local[name] = value.detach().float().cpu().contiguous()
        if self.pp_size == 1:
            # global rank 0 is DP rank 0 and TP rank 0: it already holds every full tensor
            return local if self.is_main else None
        # pipeline stages hold different tensors: collect them on rank 0 over a CPU (gloo) group, so that
        # the pickled tensors never pass through GPU memory
        if self._cpu_group is None:
            self._cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        parts = [None] * dist.get_world_size() if self.is_main else None
        dist.gather_object(local, parts, dst=0, group=self._cpu_group)
        if not self.is_main:
            return None
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, value in part.items():
                merged.setdefault(name, value)
        return merged

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from deepspeed.utils import safe_get_full_fp32_param

        return self._gather_full(safe_get_full_fp32_param)

    def full_gradients(self) -> dict[str, torch.Tensor] | None:
        """The full gradients (what the optimizer is about to use, before clipping); call from ``grad_hook``."""
        from deepspeed.utils import safe_get_full_grad

        return self._gather_full(safe_get_full_grad)

    def _optimizer_step_count(self) -> float | None:
        state = self.engine.optimizer.optimizer.state
        for value in state.values():
            if "step" in value:
                step = value["step"]
                return float(step.item() if torch.is_tensor(step) else step)
        return None

    def _relink_optimizer_state(self) -> None:
        """(Re)build ZeRO-1/2's per-parameter views of the AdamW state.

        DeepSpeed 0.19.8 links them once, right after the first group's first step, so with several
        parameter groups (ours: decay / no decay) the later groups' views stay empty; relinking fixes it.
        """
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "_hp_optimizer_states_linked"):
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()

    def save(self, directory: Path) -> None:
        from deepspeed.utils import safe_get_full_optimizer_state

        directory = Path(directory)
        weights = self.full_state_dict()
        step = self._optimizer_step_count()
        moments = {}
        if step is not None:
            self._relink_optimizer_state()
            for key in ("exp_avg", "exp_avg_sq"):
                gathered = self._gather_full(lambda p, key=key: safe_get_full_optimizer_state(p, key))
                if gathered is not None:
                    moments.update({f"{key}.{name}": value for name, value in gathered.items()})
        if self.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
            write_json_atomic(directory / CONFIG_FILE, self.model_config.to_dict())
            if step is not None:
                for name in weights:
                    moments[f"step.{name}"] = torch.tensor(step, dtype=torch.float32)
            save_file(moments, str(directory / OPTIMIZER_FILE), metadata={"format": "pt"})
        dist.barrier()

    def load(self, directory: Path) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        directory = Path(directory)
        weights_file = directory / WEIGHTS_FILE
        optimizer_file = directory / OPTIMIZER_FILE
        if not optimizer_file.is_file():
            raise FileNotFoundError(f"{directory} has no {OPTIMIZER_FILE}: not a training checkpoint")
        model = HGRN2LM(self.model_config)
        load_model_weights(model, load_file(str(weights_file)), str(weights_file))
        self._build(model)  # a fresh DeepSpeed engine around the loaded weights (exact for every ZeRO stage)
        tensors = load_file(str(optimizer_file))
        if not tensors:
            return
        names = sorted(self.names.items(), key=lambda item: item[1])
        missing = [f"{k}.{n}" for _, n in names for k in ("exp_avg", "exp_avg_sq", "step") if f"{k}.{n}" not in tensors]
        if missing:
            raise ValueError(f"{optimizer_file} does not match the model's parameters: missing {missing[:5]}")
        step = float(tensors[f"step.{names[0][1]}"])
        zero_opt = self.engine.optimizer
        base = zero_opt.optimizer
        # the fp32 partitions AdamW steps on: ZeRO-1/2 and ZeRO-3 keep them under different names
        flats = [flat for group in base.param_groups for flat in group["params"]]
        flats += list(getattr(zero_opt, "single_partition_of_fp32_groups", []) or [])
        flats += list(getattr(zero_opt, "fp32_partitioned_groups_flat", []) or [])
        for flat in {id(f): f for f in flats}.values():
            if flat not in base.state or "exp_avg" not in base.state[flat]:
                base.state[flat] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
            else:
                base.state[flat]["step"] = torch.tensor(step, dtype=torch.float32)
        self._relink_optimizer_state()
        for param, name in names:
            for key in ("exp_avg", "exp_avg_sq"):
                full = tensors[f"{key}.{name}"]
                shard = self._shard(param, name, full).to(self.device)
                safe_set_full_optimizer_state(param, shard, key)

    def _shard(self, param, name: str, full: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            padded = None
            if name in VOCAB_PARAMS:
                padded = self.vocab_padded
            return shard_tensor(full, dim, self.tp_size, self.tp_rank, padded)
        return full


def build_engine(cfg, model_config: HGRN2Config) -> ParallelEngine:
    return ParallelEngine(cfg, model_config)

"""Parallel layouts: TP × PP × DP sizes, ZeRO stage, and the checks that refuse a wrong layout at start.

Every refusal says what to change. The layouts that run (DESIGN.md §4, docs/parallelism.md):

- no PP: TP ≥ 1, DP ≥ 1, ZeRO 0–3 (DeepSpeed engine, megatron-core TP layers);
- PP > 1: DeepSpeed's pipeline engine (1F1B) with ZeRO 0 or 1, with or without TP (TP × PP × DP; tied
  word embeddings are refused with TP × PP);
- sequence parallel: TP > 1 without PP, the sequence length divisible by TP.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import ConfigError


class LayoutError(ConfigError):
    """A parallel layout that cannot run; the message says what to change (the trainer prints it, exit 2)."""


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1 or self.zero_stage > 0

    def describe(self) -> str:
        return f"TP={self.tensor} PP={self.pipeline} DP={self.data} ZeRO-{self.zero_stage}"


def resolve_layout(
    world_size: int,
    tensor: int = 1,
    pipeline: int = 1,
    zero_stage: int = 0,
    sequence_parallel: bool = False,
    model_config=None,
    seq_length: int | None = None,
) -> ParallelLayout:
    """The layout for ``world_size`` processes, DP = world / (TP·PP); raises LayoutError when it can't run."""
    for name, value in (("parallel.tensor", tensor), ("parallel.pipeline", pipeline)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"{name} must be a positive integer, got {value!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise LayoutError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    model_parallel = tensor * pipeline
    if world_size % model_parallel:
        raise LayoutError(
            f"world size {world_size} is not divisible by parallel.tensor × parallel.pipeline = "
            f"{tensor} × {pipeline} = {model_parallel}: start a multiple of {model_parallel} processes "
            f"(nodes × processes per node), or change parallel.tensor / parallel.pipeline to divide {world_size}"
        )
    layout = ParallelLayout(tensor, pipeline, world_size // model_parallel, zero_stage, sequence_parallel)
    if pipeline > 1 and zero_stage > 1:
        raise LayoutError(
            f"parallel.zero_stage={zero_stage} with parallel.pipeline={pipeline} is not supported: pipeline "
            "parallelism runs on DeepSpeed's pipeline engine, which shards only optimizer states (ZeRO-1). "
            "Set parallel.zero_stage=1 (or 0), or parallel.pipeline=1 to use ZeRO-2/3"
        )
    if sequence_parallel:
        check_sequence_parallel(layout, seq_length)
    if model_config is not None:
        check_model(layout, model_config)
    return layout


def check_sequence_parallel(layout: ParallelLayout, seq_length: int | None) -> None:
    """Sequence parallel shards the sequence over the TP group: needs TP > 1, no PP, T divisible by TP."""
    tp, pp = layout.tensor, layout.pipeline
    if tp == 1:
        raise LayoutError(
            "parallel.sequence_parallel=true shards activations along the sequence over the tensor-parallel "
            "group, so it needs parallel.tensor > 1; set parallel.tensor to 2 or more, or set "
            "parallel.sequence_parallel=false"
        )
    if pp > 1:
        raise LayoutError(
            f"parallel.sequence_parallel=true with parallel.pipeline={pp} is not supported; set "
            "parallel.pipeline=1, or set parallel.sequence_parallel=false"
        )
    if seq_length is not None and seq_length % tp:
        raise LayoutError(
            f"batch.seq_length={seq_length} is not divisible by parallel.tensor={tp}, which sequence "
            f"parallelism needs (each TP rank holds seq_length / {tp} tokens): set batch.seq_length to a "
            f"multiple of {tp}, change parallel.tensor, or set parallel.sequence_parallel=false"
        )


def check_model(layout: ParallelLayout, config) -> None:
    """Model-shape constraints of a layout (heads and GLU width divisible by TP, enough layers for PP)."""
    tp, pp = layout.tensor, layout.pipeline
    if tp > 1:
        heads = config.num_heads
        if heads % tp:
            divisors = [k for k in range(1, heads + 1) if heads % k == 0]
            raise LayoutError(
                f"the model has {heads} heads (hidden_size {config.hidden_size} / head dim "
                f"{config.expand_ratio}), not divisible by parallel.tensor={tp}: tensor parallelism shards "
                f"whole heads; set parallel.tensor to one of {divisors}"
            )
        if config.mlp_size % tp:
            raise LayoutError(
                f"the GLU width {config.mlp_size} is not divisible by parallel.tensor={tp}; change "
                "parallel.tensor or model.intermediate_size"
            )
    if tp > 1 and pp > 1 and config.tie_word_embeddings:
        raise LayoutError(
            f"tied word embeddings with parallel.tensor={tp} and parallel.pipeline={pp} together are not supported: "
            "set model.tie_word_embeddings=false, or use one of tensor / pipeline parallelism"
        )
    if pp > config.num_layers:
        raise LayoutError(
            f"parallel.pipeline={pp} stages but the model has only {config.num_layers} layers: every stage "
            f"needs at least one layer; set parallel.pipeline to at most {config.num_layers}"
        )


def layout_from_config(cfg, world_size: int, model_config=None) -> ParallelLayout:
    """The layout of a ``pretrain.config.TrainConfig`` (its ``parallel`` section) for ``world_size``."""
    p = cfg.parallel
    return resolve_layout(
        world_size, p.tensor, p.pipeline, p.zero_stage, getattr(p, "sequence_parallel", False), model_config,
        cfg.batch.seq_length,
    )

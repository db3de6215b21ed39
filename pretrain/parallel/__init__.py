"""Distributed training for HGRN2: tensor parallel (megatron-core), pipeline parallel (DeepSpeed's
pipeline engine), data parallel with DeepSpeed ZeRO 1/2/3; see docs/parallelism.md.

``build_engine(cfg, model_config)`` is what ``pretrain.engine.build_engine`` calls when a parallel size
is above one. Importing this package imports neither DeepSpeed nor megatron-core.
"""

from pretrain.parallel.layout import LayoutError, ParallelLayout, resolve_layout


def build_engine(cfg, model_config):
    """A ``ParallelEngine`` for the layout of ``cfg.parallel`` and the launcher's world size."""
    from pretrain.parallel.engine import ParallelEngine

    return ParallelEngine(cfg, model_config)


__all__ = ["LayoutError", "ParallelLayout", "build_engine", "resolve_layout"]

"""Pipeline parallelism on DeepSpeed's pipeline engine (``PipelineModule`` + ``train_batch``, 1F1B).

The plain ``HGRN2LM`` is cut into a layer sequence:

    [Embed, (Γ, Block 0), (Γ, Block 1), ..., (Γ, Block L-1), Head]

``Γ`` is a ``TiedLayerSpec`` placed before every block, so every stage builds one copy of the whole
Γ (β is a cumsum over all layers) and DeepSpeed all-reduces its gradient across the stages that hold
it (``allreduce_tied_weight_gradients``), like tied embeddings. Its forward is the identity; the
blocks read β from their stage's copy. With tied word embeddings, Embed and Head are one tied module
on the first and last stage.

Stages are balanced by parameter count (the embedding counted on the first stage, the head on the
last) unless ``HGRN2_PIPELINE_PARTITION`` overrides it: ``uniform`` (blocks split evenly) or a list of
block counts per stage, e.g. ``3,1``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn as nn

from hgrn2.model import HGRN2LM


class LowerBounds(nn.Module):
    """Γ [L, d] as a module, so DeepSpeed can tie it across pipeline stages."""

    def __init__(self, num_layers: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers, hidden_size))

    def betas(self, config) -> list[torch.Tensor | None]:
        # The single-process model's own code, on this Γ.
        return HGRN2LM.lower_bound_values(SimpleNamespace(lower_bounds=self.weight, config=config))


def _identity(module, inputs):
    return inputs


class EmbedStage(nn.Module):
    def __init__(self, embeddings: nn.Module, model: HGRN2LM) -> None:
        super().__init__()
        self.embeddings = embeddings
        self._check = model.check_token_ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check(input_ids)
        return self.embeddings(input_ids)


class BlockStage(nn.Module):
    def __init__(self, block: nn.Module, index: int, config) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.config = config
        self._bounds: list[LowerBounds] = []  # the stage's tied Γ module, set after the build (not a child)
        self.activation_checkpointing = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        beta = self._bounds[0].betas(self.config)[self.index] if self._bounds else None
        if self.activation_checkpointing and self.training:
            from torch.utils.checkpoint import checkpoint

            out, _ = checkpoint(self.block, hidden, beta, None, None, False, use_reentrant=False)
        else:
            out, _ = self.block(hidden, beta)
        return out


class HeadStage(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module | None) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        return hidden if self.lm_head is None else self.lm_head(hidden)


class TiedEmbedding(nn.Module):
    """Tied word embeddings: the embedding on the first stage, the LM head's weight on the last."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))


def _tied_embed(module: TiedEmbedding, input_ids):
    return torch.nn.functional.embedding(input_ids, module.weight)


def block_partition(config, num_stages: int, method: str | None = None) -> list[int]:
    """Blocks per stage: balanced by parameter count, ``uniform``, or explicit counts (``"3,1"``)."""
    layers = config.num_layers
    method = (method or os.environ.get("HGRN2_PIPELINE_PARTITION") or "parameters").strip().lower()
    if method == "uniform":
        base, extra = divmod(layers, num_stages)
        return [base + (1 if s < extra else 0) for s in range(num_stages)]
    if method == "parameters":
        d, mlp, vocab = config.hidden_size, config.mlp_size, config.vocab_size
        block = 4 * d * d + d + 3 * d * mlp + 2 * d
        weights = [block] * layers
        weights[0] += vocab * d
        weights[-1] += vocab * d + d
        return _balanced(weights, num_stages)
    try:
        counts = [int(x) for x in method.split(",")]
    except ValueError:
        raise ValueError(
            f"HGRN2_PIPELINE_PARTITION={method!r}: use 'parameters', 'uniform' or block counts per stage like '3,1'"
        ) from None
    if len(counts) != num_stages or sum(counts) != layers or min(counts) < 1:
        raise ValueError(
            f"HGRN2_PIPELINE_PARTITION={method!r} must give {num_stages} positive block counts summing to {layers}"
        )
    return counts


def _balanced(weights: list[int], parts: int) -> list[int]:
    """Contiguous split of ``weights`` into ``parts`` non-empty runs minimising the heaviest run."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: minimal max-load splitting the first i items into k runs
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                load = max(best[k - 1][j], prefix[i] - prefix[j])
                if load < best[k][i]:
                    best[k][i], cut[k][i] = load, j
    counts, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def build_pipeline_module(
    model: HGRN2LM, num_stages: int, loss_fn, partition: list[int] | None = None, topology=None
):
    """A DeepSpeed ``PipelineModule`` holding this stage's part of ``model`` (weights copied from it).

    ``model`` may already be tensor-parallel (``apply_tensor_parallel``); then ``topology`` is DeepSpeed's
    ``PipeModelDataParallelTopology`` and Γ's stage copies hold this TP rank's shard.
    """
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    config = model.config
    gamma_width = model.lower_bounds.shape[1] if model.lower_bounds is not None else config.hidden_size
    counts = partition or block_partition(config, num_stages)
    tied = config.tie_word_embeddings
    layers: list = []
    if tied:
        layers.append(
            TiedLayerSpec("embed", TiedEmbedding, config.vocab_size, config.hidden_size, forward_fn=_tied_embed)
        )
    else:
        layers.append(EmbedStage(model.embeddings, model))
    for index, block in enumerate(model.layers):
        if model.lower_bounds is not None:
            layers.append(
                TiedLayerSpec("lower_bounds", LowerBounds, config.num_layers, gamma_width, forward_fn=_identity)
            )
        layers.append(BlockStage(block, index, config))
    if tied:
        layers.append(HeadStage(model.norm, None))
        layers.append(
            TiedLayerSpec(
                "embed", TiedEmbedding, config.vocab_size, config.hidden_size,
                forward_fn=lambda module, hidden: torch.nn.functional.linear(hidden, module.weight),
            )
        )
    else:
        layers.append(HeadStage(model.norm, model.lm_head))

    per_block = 2 if model.lower_bounds is not None else 1
    bounds = [0]
    start = 1
    for count in counts[:-1]:
        start += per_block * count
        bounds.append(start)
    bounds.append(len(layers))
    class HGRN2Pipeline(PipelineModule):
        def _partition_layers(self, method="uniform"):
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self.parts = bounds
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    if topology is None:
        module = HGRN2Pipeline(layers=layers, num_stages=num_stages, loss_fn=loss_fn, partition_method="explicit")
    else:
        module = HGRN2Pipeline(layers=layers, topology=topology, loss_fn=loss_fn, partition_method="explicit")
    module._layer_specs = None  # drop references to the other stages' modules
    with torch.no_grad():
        if "lower_bounds" in module.tied_modules:
            module.tied_modules["lower_bounds"].weight.copy_(model.lower_bounds)
        if "embed" in module.tied_modules:
            module.tied_modules["embed"].weight.copy_(model.embeddings.weight)
    bound = None
    for key, tied_module in module.tied_modules.items():  # a ModuleDict: its .get would be ruled out
        if key == "lower_bounds":
            bound = tied_module
            source = model.lower_bounds
            if getattr(source, "tensor_model_parallel", False):  # Γ sharded on d under TP
                from megatron.core import tensor_parallel

                tensor_parallel.set_tensor_model_parallel_attributes(bound.weight, True, source.partition_dim, 1)
    for layer in module.forward_funcs:
        if isinstance(layer, BlockStage) and bound is not None:
            layer._bounds = [bound]
    _zero_fill_unused_tied_grads(module)
    return module, counts


def _zero_fill_unused_tied_grads(module) -> None:
    """A stage whose blocks never read Γ (only block 0, which has no β) has no gradient for its copy, and
    DeepSpeed then skips that stage's side of the tied all-reduce (``if grad is not None``): the other
    stages hang. Give such copies a zero gradient before the reduction."""
    original = module.get_tied_weights_and_groups

    def tied_weights_and_groups():
        pairs = original()
        for weight, _ in pairs:
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            if hasattr(weight, "_hp_grad") and weight._hp_grad is None:
                weight._hp_grad = torch.zeros_like(weight, dtype=torch.float32)
        return pairs

    module.get_tied_weights_and_groups = tied_weights_and_groups


def canonical_names(module, model: HGRN2LM) -> dict[nn.Parameter, str]:
    """This stage's parameters → their single-process names (``model.named_parameters()``)."""
    by_identity = {id(p): name for name, p in model.named_parameters()}
    names = {}
    for name, parameter in module.named_parameters():
        if name.startswith("tied_modules.lower_bounds."):
            names[parameter] = "lower_bounds"
        elif name.startswith("tied_modules.embed."):
            names[parameter] = "embeddings.weight"
        elif id(parameter) in by_identity:
            names[parameter] = by_identity[id(parameter)]
        else:  # pragma: no cover - a bug in the mapping
            raise RuntimeError(f"pipeline parameter {name} has no single-process name")
    return names

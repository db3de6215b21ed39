"""Tensor parallelism for the plain ``HGRN2LM``, applied as a separate step (torchtitan style).

``apply_tensor_parallel(model)`` swaps the model's modules for megatron-core's tensor-parallel layers
and copies this rank's shard of the single-process weights into them, so a test can build the
single-process model, shard it, and compare. After it:

- ``q_proj, f_proj, i_proj`` and the GLU's ``gate_proj, up_proj``: ColumnParallelLinear (heads sharded);
  HGRU2 reshapes by head dim, so it runs unchanged on d/TP features;
- ``o_proj`` and ``down_proj``: RowParallelLinear (output all-reduced);
- the HGRU2 output RMSNorm: its weight sharded, its mean square summed across the TP group;
- Γ (``lower_bounds``): sharded on d (β is a per-column cumsum over layers, so shards are independent);
- embedding: VocabParallelEmbedding; LM head: column-parallel over the vocabulary, returning this rank's
  logits, for ``vocab_parallel_cross_entropy``. The vocabulary is padded to a multiple of TP, the
  padded logits masked to -inf (the function is unchanged); checkpoints strip the padding.

Every sharded parameter carries megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes
(DeepSpeed's grad-norm and ``gather_full_state_dict`` read them).

With ``sequence_parallel=True`` (Megatron-style) the residual stream between the mixers is sharded along
the sequence across the TP group, sequence-first ``[T/TP, B, d]`` as megatron's mappings expect (they
gather and scatter dim 0):

- the embedding reduce-scatters its vocabulary-partial output to sequence shards (megatron's
  ``reduce_scatter_embeddings``, which also transposes ``[B, T] -> [T, B]``);
- ``attn_norm``, ``mlp_norm`` and the final ``norm`` normalise this rank's tokens, then all-gather the
  sequence once for all the column-parallel projections behind them (q/f/i, gate/up, LM head: local matmuls,
  no further collective); their backward reduce-scatters the input gradient;
- ``o_proj`` and ``down_proj`` reduce-scatter to sequence shards instead of all-reducing;
- HGRU2 sees the full sequence for its local heads (batch-first ``[B, T, d/TP]``: the attention norm's
  gather hands it over transposed, ``o_proj`` transposes back), so the recurrence and ``TPRMSNorm`` run
  unchanged;
- the three norm weights are replicated but see only this rank's tokens: their gradients are all-reduced
  across TP by a hook as they are produced (marked ``sequence_parallel``, as megatron marks them).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hgrn2.fused import IGNORE_INDEX, rms_norm
from hgrn2.model import RMSNorm


def _megatron():
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel

    return ModelParallelConfig, parallel_state, tensor_parallel


def _noop_init(weight: torch.Tensor) -> None:
    return None


def mp_config(tp_size: int, dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
    ModelParallelConfig, _, _ = _megatron()
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
    )


class TPRMSNorm(nn.Module):
    """RMSNorm over a hidden dim sharded across the TP group: local weight shard, global mean square."""

    def __init__(self, local_size: int, full_size: int, eps: float, group) -> None:
        super().__init__()
        self.eps = eps
        self.full_size = full_size
        self.group = group
        self.weight = nn.Parameter(torch.ones(local_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.group, self.full_size)


def _column_cls():
    _, _, tp = _megatron()

    class ColumnParallel(tp.ColumnParallelLinear):
        """ColumnParallelLinear that returns only its output (our modules call ``proj(x)``)."""

        def forward(self, x):  # noqa: D102
            return super().forward(x)[0]

    class RowParallel(tp.RowParallelLinear):
        """RowParallelLinear returning its output; ``batch_first_input``: SP input [B, T, f] to [T, B, f] first."""

        batch_first_input = False

        def forward(self, x):  # noqa: D102
            if self.batch_first_input:
                x = x.transpose(0, 1)  # megatron reduce-scatters dim 0: make it the sequence
            return super().forward(x)[0]

    class VocabParallelHead(tp.ColumnParallelLinear):
        """The LM head over this rank's vocabulary slice; logits of padded vocabulary rows are -inf."""

        def __init__(self, *args, vocab_size: int, vocab_start: int, **kwargs):
            super().__init__(*args, **kwargs)
            local = self.output_size_per_partition
            pad = torch.arange(vocab_start, vocab_start + local) >= vocab_size
            self.register_buffer("pad_mask", pad, persistent=False)
            self.has_pad = bool(pad.any())

        def forward(self, x):  # noqa: D102
            logits = super().forward(x)[0]
            if self.has_pad:
                logits = logits.masked_fill(self.pad_mask.to(logits.device), float("-inf"))
            return logits

    return ColumnParallel, RowParallel, VocabParallelHead


def _set_tp_attrs(param: torch.Tensor, dim: int) -> None:
    for name in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, name):
            delattr(param, name)
    _, _, tp = _megatron()
    tp.set_tensor_model_parallel_attributes(param, True, dim, 1)


def _all_reduce_grad_hook(group):
    """A tensor hook that sums a gradient across ``group``."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm over this rank's tokens (sequence-first ``[T/TP, B, d]``), then the whole sequence all-gathered.

    The gathered output feeds column-parallel projections; ``batch_first`` hands it over as ``[B, T, d]``.
    Backward reduce-scatters, which also sums the partial input gradients of those projections across TP.
    """

    def __init__(self, size: int, eps: float, group, batch_first: bool) -> None:
        super().__init__(size, eps)
        self.group = group
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, tp = _megatron()
        full = tp.gather_from_sequence_parallel_region(
            super().forward(x), tensor_parallel_output_grad=True, group=self.group
        )
        return full.transpose(0, 1) if self.batch_first else full


def _sequence_parallel_norm(norm: RMSNorm, batch_first: bool, group) -> SequenceParallelRMSNorm:
    """``norm`` as a ``SequenceParallelRMSNorm`` with the same weight.

    The weight is replicated but sees only this rank's tokens, so its gradient is summed across TP as it is
    produced: a tensor hook runs before the gradient is accumulated, hence before DeepSpeed's hooks see it,
    whatever the ZeRO stage (megatron's own finalize step does this for ``sequence_parallel`` parameters).
    """
    new = SequenceParallelRMSNorm(norm.weight.shape[0], norm.eps, group, batch_first)
    new.weight.copy_(norm.weight)
    new.weight.sequence_parallel = True
    new.weight.register_hook(_all_reduce_grad_hook(group))
    return new


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return int(math.ceil(vocab_size / tp_size) * tp_size)


@torch.no_grad()
def apply_tensor_parallel(
    model, tp_size: int | None = None, tp_rank: int | None = None, group=None, sequence_parallel: bool = False
):
    """Shard ``model`` (an ``hgrn2.HGRN2LM`` with full single-process weights) in place for this TP rank.

    ``sequence_parallel``: Megatron-style sequence parallelism (module docstring); the model then takes
    ``[B, T]`` token ids with T divisible by TP and returns batch-first logits as before.
    """
    _, ps, tp = _megatron()
    tp_size = ps.get_tensor_model_parallel_world_size() if tp_size is None else tp_size
    tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    group = ps.get_tensor_model_parallel_group() if group is None else group
    if tp_size == 1:
        if sequence_parallel:
            raise ValueError("sequence parallelism needs a tensor-parallel group larger than one")
        return model
    config = model.config
    if config.num_heads % tp_size or config.mlp_size % tp_size:
        raise ValueError(f"heads ({config.num_heads}) and GLU width ({config.mlp_size}) must divide by TP={tp_size}")
    ColumnParallel, RowParallel, VocabParallelHead = _column_cls()
    cfg = mp_config(tp_size, model.embeddings.weight.dtype)
    # SP: row-parallel layers reduce-scatter; column-parallel ones get the gathered sequence from the norm in
    # front of them and need no collective of their own (``disable_grad_reduce``)
    row_cfg = mp_config(tp_size, model.embeddings.weight.dtype, sequence_parallel)
    d, mlp, vocab = config.hidden_size, config.mlp_size, config.vocab_size
    vocab_pad = padded_vocab_size(vocab, tp_size)

    def rows(weight: torch.Tensor, rank: int = tp_rank) -> torch.Tensor:
        return weight.chunk(tp_size, dim=0)[rank]

    def cols(weight: torch.Tensor) -> torch.Tensor:
        return weight.chunk(tp_size, dim=-1)[tp_rank]

    def column(linear: nn.Linear, out_features: int, in_features: int):
        new = ColumnParallel(
            in_features, out_features, config=cfg, init_method=_noop_init, bias=False, gather_output=False,
            disable_grad_reduce=sequence_parallel,
        )
        new.weight.copy_(rows(linear.weight))
        _set_tp_attrs(new.weight, 0)
        return new

    def row(linear: nn.Linear, out_features: int, in_features: int, batch_first_input: bool = False):
        new = RowParallel(
            in_features, out_features, config=row_cfg, init_method=_noop_init, bias=False, input_is_parallel=True,
            skip_bias_add=False,
        )
        new.batch_first_input = sequence_parallel and batch_first_input
        new.weight.copy_(cols(linear.weight))
        _set_tp_attrs(new.weight, 1)
        return new

    full_embed = model.embeddings.weight
    if vocab_pad != vocab:
        full_embed = F.pad(full_embed, (0, 0, 0, vocab_pad - vocab))
    embeddings = tp.VocabParallelEmbedding(
        vocab_pad, d, init_method=_noop_init, config=cfg, reduce_scatter_embeddings=sequence_parallel
    )
    embeddings.weight.copy_(rows(full_embed))
    _set_tp_attrs(embeddings.weight, 0)
    tied = config.tie_word_embeddings
    full_head = full_embed if tied else model.lm_head.weight
    if not tied and vocab_pad != vocab:
        full_head = F.pad(full_head, (0, 0, 0, vocab_pad - vocab))
    head = VocabParallelHead(
        d, vocab_pad, config=cfg, init_method=_noop_init, bias=False, gather_output=False,
        skip_weight_param_allocation=False, vocab_size=vocab, vocab_start=tp_rank * (vocab_pad // tp_size),
        disable_grad_reduce=sequence_parallel,
    )
    head.weight.copy_(rows(full_head))
    _set_tp_attrs(head.weight, 0)
    model.embeddings = embeddings
    model.lm_head = head
    if tied:
        model.lm_head.weight = model.embeddings.weight

    if model.lower_bounds is not None:
        shard = nn.Parameter(cols(model.lower_bounds).clone())
        _set_tp_attrs(shard, 1)
        model.lower_bounds = shard

    for layer in model.layers:
        attn, mlp_mod = layer.attn, layer.mlp
        attn.q_proj = column(attn.q_proj, d, d)
        attn.f_proj = column(attn.f_proj, d, d)
        attn.i_proj = column(attn.i_proj, d, d)
        norm = TPRMSNorm(d // tp_size, d, attn.g_norm.eps, group)
        norm.weight.copy_(rows(attn.g_norm.weight))
        _set_tp_attrs(norm.weight, 0)
        attn.g_norm = norm
        attn.o_proj = row(attn.o_proj, d, d, batch_first_input=True)
        mlp_mod.gate_proj = column(mlp_mod.gate_proj, mlp, d)
        mlp_mod.up_proj = column(mlp_mod.up_proj, mlp, d)
        mlp_mod.down_proj = row(mlp_mod.down_proj, d, mlp)
        if sequence_parallel:
            # HGRU2 is batch-first ([B, T, H, n]); the GLU is elementwise over tokens and stays sequence-first
            layer.attn_norm = _sequence_parallel_norm(layer.attn_norm, batch_first=True, group=group)
            layer.mlp_norm = _sequence_parallel_norm(layer.mlp_norm, batch_first=False, group=group)
    if sequence_parallel:
        model.norm = _sequence_parallel_norm(model.norm, batch_first=True, group=group)  # head: [B, T, V/TP]
    model.tensor_parallel = {
        "size": tp_size, "rank": tp_rank, "vocab_padded": vocab_pad, "sequence_parallel": sequence_parallel
    }
    return model


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, tp_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of counted tokens); labels ``-100`` are ignored.

    With TP the logits are this rank's vocabulary slice and megatron's ``vocab_parallel_cross_entropy``
    computes the exact softmax across ranks.
    """
    labels = labels.to(logits.device)
    mask = labels != IGNORE_INDEX
    if tp_size > 1:
        _, _, tp = _megatron()
        losses = tp.vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))
        total = (losses * mask).sum()
    else:
        total = F.cross_entropy(
            logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return total, mask.sum()


def gather_tensor_parallel(tensor: torch.Tensor, dim: int, group, tp_size: int) -> torch.Tensor:
    """All-gather a TP shard along ``dim`` into the full tensor (every rank gets it)."""
    parts = [torch.empty_like(tensor) for _ in range(tp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def shard_tensor(full: torch.Tensor, dim: int, tp_size: int, tp_rank: int, padded: int | None = None) -> torch.Tensor:
    """This rank's shard of a full tensor along ``dim`` (padding rows with zeros up to ``padded``)."""
    if padded is not None and padded != full.shape[dim]:
        pad = [0, 0] * (full.dim() - 1 - dim) + [0, padded - full.shape[dim]]
        full = F.pad(full, pad)
    return full.chunk(tp_size, dim=dim)[tp_rank].contiguous()

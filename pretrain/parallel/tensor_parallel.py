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
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


def _megatron():
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel

    return ModelParallelConfig, parallel_state, tensor_parallel


def _noop_init(weight: torch.Tensor) -> None:
    return None


def mp_config(tp_size: int, dtype: torch.dtype = torch.float32):
    ModelParallelConfig, _, _ = _megatron()
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
    )


class _AllReduceSum(torch.autograd.Function):
    """Sum across a group in forward and in backward (a value every rank uses, computed from all ranks)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class TPRMSNorm(nn.Module):
    """RMSNorm over a hidden dim sharded across the TP group: local weight shard, global mean square."""

    def __init__(self, local_size: int, full_size: int, eps: float, group) -> None:
        super().__init__()
        self.eps = eps
        self.full_size = full_size
        self.group = group
        self.weight = nn.Parameter(torch.ones(local_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        sum_sq = _AllReduceSum.apply(x32.pow(2).sum(-1, keepdim=True), self.group)
        normed = x32 * torch.rsqrt(sum_sq / self.full_size + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def _column_cls():
    _, _, tp = _megatron()

    class ColumnParallel(tp.ColumnParallelLinear):
        """ColumnParallelLinear that returns only its output (our modules call ``proj(x)``)."""

        def forward(self, x):  # noqa: D102
            return super().forward(x)[0]

    class RowParallel(tp.RowParallelLinear):
        def forward(self, x):  # noqa: D102
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


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return int(math.ceil(vocab_size / tp_size) * tp_size)


@torch.no_grad()
def apply_tensor_parallel(model, tp_size: int | None = None, tp_rank: int | None = None, group=None):
    """Shard ``model`` (an ``hgrn2.HGRN2LM`` with full single-process weights) in place for this TP rank."""
    _, ps, tp = _megatron()
    tp_size = ps.get_tensor_model_parallel_world_size() if tp_size is None else tp_size
    tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    group = ps.get_tensor_model_parallel_group() if group is None else group
    if tp_size == 1:
        return model
    config = model.config
    if config.num_heads % tp_size or config.mlp_size % tp_size:
        raise ValueError(f"heads ({config.num_heads}) and GLU width ({config.mlp_size}) must divide by TP={tp_size}")
    ColumnParallel, RowParallel, VocabParallelHead = _column_cls()
    cfg = mp_config(tp_size, model.embeddings.weight.dtype)
    d, mlp, vocab = config.hidden_size, config.mlp_size, config.vocab_size
    vocab_pad = padded_vocab_size(vocab, tp_size)

    def rows(weight: torch.Tensor, rank: int = tp_rank) -> torch.Tensor:
        return weight.chunk(tp_size, dim=0)[rank]

    def cols(weight: torch.Tensor) -> torch.Tensor:
        return weight.chunk(tp_size, dim=-1)[tp_rank]

    def column(linear: nn.Linear, out_features: int, in_features: int):
        new = ColumnParallel(
            in_features, out_features, config=cfg, init_method=_noop_init, bias=False, gather_output=False
        )
        new.weight.copy_(rows(linear.weight))
        _set_tp_attrs(new.weight, 0)
        return new

    def row(linear: nn.Linear, out_features: int, in_features: int):
        new = RowParallel(
            in_features, out_features, config=cfg, init_method=_noop_init, bias=False, input_is_parallel=True,
            skip_bias_add=False,
        )
        new.weight.copy_(cols(linear.weight))
        _set_tp_attrs(new.weight, 1)
        return new

    full_embed = model.embeddings.weight
    if vocab_pad != vocab:
        full_embed = F.pad(full_embed, (0, 0, 0, vocab_pad - vocab))
    embeddings = tp.VocabParallelEmbedding(vocab_pad, d, init_method=_noop_init, config=cfg)
    embeddings.weight.copy_(rows(full_embed))
    _set_tp_attrs(embeddings.weight, 0)
    tied = config.tie_word_embeddings
    full_head = full_embed if tied else model.lm_head.weight
    if not tied and vocab_pad != vocab:
        full_head = F.pad(full_head, (0, 0, 0, vocab_pad - vocab))
    head = VocabParallelHead(
        d, vocab_pad, config=cfg, init_method=_noop_init, bias=False, gather_output=False,
        skip_weight_param_allocation=False, vocab_size=vocab, vocab_start=tp_rank * (vocab_pad // tp_size),
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
        attn.o_proj = row(attn.o_proj, d, d)
        mlp_mod.gate_proj = column(mlp_mod.gate_proj, mlp, d)
        mlp_mod.up_proj = column(mlp_mod.up_proj, mlp, d)
        mlp_mod.down_proj = row(mlp_mod.down_proj, d, mlp)
    model.tensor_parallel = {"size": tp_size, "rank": tp_rank, "vocab_padded": vocab_pad}
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

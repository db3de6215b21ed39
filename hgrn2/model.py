"""The HGRN2 language model: HGRU2 token mixer, GLU channel mixer, lower bounds by cumax over layers.

It computes the same function as fla's ``HGRN2ForCausalLM`` with the same parameter names (less the
``model.`` prefix), so checkpoints convert both ways by renaming (``hgrn2.convert``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from hgrn2.config import HGRN2Config
from hgrn2.fused import linear_cross_entropy_sum, rms_norm, swish_product
from hgrn2.recurrence import hgrn2_decode, hgrn2_recurrence


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as fla's (saving only its input: ``hgrn2.fused``)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class HGRU2(nn.Module):
    """The token mixer: per head, S_t = Diag(f_t) S_{t-1} + (1 - f_t) i_t^T and o_t = q_t S_t / sqrt(n)."""

    def __init__(self, config: HGRN2Config) -> None:
        super().__init__()
        d = config.hidden_size
        self.head_dim = config.expand_ratio
        self.backend = config.backend
        self.chunk_size = config.chunk_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.f_proj = nn.Linear(d, d, bias=False)
        self.i_proj = nn.Linear(d, d, bias=False)
        self.g_norm = RMSNorm(d, eps=config.gate_norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def _gates(self, x: torch.Tensor, lower_bound: torch.Tensor | None):
        q = self._heads(self.q_proj(x))  # pre-swish: the recurrence applies it (fused in the Triton kernels)
        f_logit = self._heads(self.f_proj(x))
        i = self._heads(self.i_proj(x))
        bound = None if lower_bound is None else self._heads(lower_bound)
        return q, f_logit, i, bound

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.g_norm(o.flatten(-2)))

    def forward(
        self,
        x: torch.Tensor,
        lower_bound: torch.Tensor | None,
        state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, f_logit, i, bound = self._gates(x, lower_bound)
        o, final_state = hgrn2_recurrence(
            self.backend, q, f_logit, i, bound, state, return_state, cu_seqlens, self.chunk_size
        )
        return self._output(o), final_state

    def step(self, x: torch.Tensor, lower_bound: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
        """One token per row (x [B, d]); ``state`` [B, H, n, n] is updated in place."""
        q, f_logit, i, bound = self._gates(x, lower_bound)
        return self._output(hgrn2_decode(self.backend, q, f_logit, i, state, bound))


class GLU(nn.Module):
    """The channel mixer: down(swish(gate(x)) * up(x))."""

    def __init__(self, config: HGRN2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.mlp_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.mlp_size, bias=False)
        self.down_proj = nn.Linear(config.mlp_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swish_product(self.gate_proj(x), self.up_proj(x)))


class HGRN2Block(nn.Module):
    def __init__(self, config: HGRN2Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = HGRU2(config)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GLU(config)

    def forward(self, x, lower_bound, state=None, cu_seqlens=None, return_state=False):
        mixed, final_state = self.attn(self.attn_norm(x), lower_bound, state, cu_seqlens, return_state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), final_state

    def step(self, x: torch.Tensor, lower_bound: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.step(self.attn_norm(x), lower_bound, state)
        return x + self.mlp(self.mlp_norm(x))


class HGRN2LM(nn.Module):
    """Embedding → blocks → RMSNorm → LM head.

    ``model(input_ids)`` gives logits [B, T, V]; with ``state`` (from ``init_state``) it continues from
    it, and with ``return_state=True`` it also returns the state after the last token, which ``step``
    continues one token at a time in O(1) per token.
    """

    def __init__(self, config: HGRN2Config) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lower_bounds = (
            nn.Parameter(torch.zeros(config.num_layers, config.hidden_size)) if config.use_lower_bound else None
        )
        self.layers = nn.ModuleList(HGRN2Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, initializer_range) for linears and the embedding, ones for norms, zeros for Γ."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.lower_bounds is not None:
            nn.init.zeros_(self.lower_bounds)

    def lower_bound_values(self) -> list[torch.Tensor | None]:
        """β per layer: cumsum(softmax(Γ, dim 0)) minus that of layer 0; layer 0 (β = 0) gets None."""
        if self.lower_bounds is None:
            return [None] * self.config.num_layers
        probs = self.lower_bounds.softmax(0, dtype=torch.float32)
        betas = probs.cumsum(0) - probs[0]
        return [None] + list(betas[1:].unbind(0))

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """Per-layer state shape for one sequence: (H, n, n)."""
        n = self.config.expand_ratio
        return (self.config.num_heads, n, n)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Zero recurrent state [L, B, H, n, n] (fp32) for ``step`` or a stateful forward."""
        device = self.embeddings.weight.device if device is None else device
        return torch.zeros(self.config.num_layers, batch_size, *self.state_shape, device=device)

    def check_token_ids(self, token_ids: torch.Tensor) -> None:
        if token_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        if token_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token ids must be int32 or int64, got {token_ids.dtype}")
        if token_ids.numel() == 0:
            raise ValueError("token ids are empty")
        low, high = (v.item() for v in torch.aminmax(token_ids))
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size}")

    def forward(
        self,
        input_ids: torch.Tensor,
        state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_state: bool = False,
        labels: torch.Tensor | None = None,
        loss_chunk_rows: int = 4096,
    ):
        """Logits [B, T, V]; ``(logits, state)`` when ``return_state``.

        ``cu_seqlens`` packs several documents into one row (B = 1): the state resets at each boundary,
        and the states are then per document. With ``labels`` [B, T] (the next token at each position, -100
        where not counted) it returns instead the summed token cross-entropy (fp32 scalar), formed
        ``loss_chunk_rows`` positions at a time without materialising the logits (``hgrn2.fused``).
        """
        if labels is not None and return_state:
            raise ValueError("labels (a loss) and return_state (logits and state) cannot be combined")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        self.check_token_ids(input_ids)
        x = self.embeddings(input_ids)
        final_states = []
        for index, (layer, beta) in enumerate(zip(self.layers, self.lower_bound_values(), strict=True)):
            layer_state = None if state is None else state[index]
            if self.activation_checkpointing and self.training:
                x, final = checkpoint(layer, x, beta, layer_state, cu_seqlens, return_state, use_reentrant=False)
            else:
                x, final = layer(x, beta, layer_state, cu_seqlens, return_state)
            final_states.append(final)
        hidden = self.norm(x)
        if labels is not None:
            return linear_cross_entropy_sum(hidden, self.lm_head.weight, labels, loss_chunk_rows)
        logits = self.lm_head(hidden)
        return (logits, torch.stack(final_states)) if return_state else logits

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per sequence (token_ids [B]) → (logits [B, V], state), the state updated in place."""
        if token_ids.dim() != 1:
            raise ValueError(f"step takes one token per sequence, [batch]; got shape {tuple(token_ids.shape)}")
        expected = (self.config.num_layers, token_ids.shape[0], *self.state_shape)
        if tuple(state.shape) != expected:
            raise ValueError(f"state must have shape {expected} (see init_state), got {tuple(state.shape)}")
        self.check_token_ids(token_ids)
        x = self.embeddings(token_ids)
        for index, (layer, beta) in enumerate(zip(self.layers, self.lower_bound_values(), strict=True)):
            x = layer.step(x, beta, state[index])
        return self.lm_head(self.norm(x)), state

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Prompt [B, T] → [B, T + max_new_tokens]; see ``hgrn2.generation.generate`` for the options."""
        from hgrn2.generation import generate

        return generate(self, prompt_ids, max_new_tokens, **sampling)

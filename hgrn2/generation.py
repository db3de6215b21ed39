"""Sampling from an HGRN2 model: prefill with the parallel form, continue with the O(1) ``step``."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hgrn2.model import HGRN2LM


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits [B, V]; temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best one always stays.
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _GraphedStep:
    """``model.step`` captured in a CUDA graph over its own static token and state buffers."""

    def __init__(self, model: HGRN2LM, state: torch.Tensor) -> None:
        self.state = state.clone()
        self.tokens = torch.zeros(state.shape[1], dtype=torch.long, device=state.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: compiles kernels, allocates
            model.step(self.tokens, self.state)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, _ = model.step(self.tokens, self.state)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


# Captured steps per model, reused by later ``generate`` calls (a capture costs far more than a step). The key
# holds every parameter's address: a graph reads the weights in place, so moving or casting the model (new
# storage) must not replay an old graph, while in-place updates (an optimizer step) are seen by it.
_GRAPHED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graphed_step(model: HGRN2LM, state: torch.Tensor) -> _GraphedStep:
    """The cached captured step for this model and state shape, its state set to ``state``."""
    key = (tuple(state.shape), state.dtype, state.device, tuple(p.data_ptr() for p in model.parameters()))
    steps = _GRAPHED_STEPS.setdefault(model, {})
    if key not in steps:
        steps.clear()  # at most one captured step per model: each holds its own graph memory pool
        steps[key] = _GraphedStep(model, state)
    step = steps[key]
    step.state.copy_(state)
    return step


@torch.no_grad()
def generate(
    model: HGRN2LM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    use_cuda_graph: bool = False,
) -> torch.Tensor:
    """Continue each prompt row by ``max_new_tokens`` tokens.

    Rows that emit ``eos_token_id`` keep emitting it. With a ``seed`` the result is deterministic.
    ``use_cuda_graph`` replays the per-token step as one CUDA graph (CUDA only), captured on the first call
    and reused by later calls with the same batch size (``graphed_step``).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [batch, prompt_len] with prompt_len > 0, got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    state = model.init_state(prompt_ids.shape[0], device=prompt_ids.device)
    logits, state = model(prompt_ids, state=state, return_state=True)
    step = graphed_step(model, state) if use_cuda_graph else (lambda tokens: model.step(tokens, state)[0])
    next_logits = logits[:, -1]
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    generated = []
    for index in range(max_new_tokens):
        token = sample_next(next_logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        generated.append(token)
        if index + 1 < max_new_tokens:
            next_logits = step(token)
    model.train(was_training)
    return torch.cat([prompt_ids, torch.stack(generated, 1).to(prompt_ids.dtype)], 1) if generated else prompt_ids

"""The model on CUDA with the Triton kernels, against the chunked-PyTorch reference backend (GPU only)."""

import pytest
import torch

from hgrn2 import HGRN2LM, generation, preset

pytestmark = pytest.mark.gpu


def model_pair(**overrides) -> tuple[HGRN2LM, HGRN2LM]:
    torch.manual_seed(0)
    triton_model = HGRN2LM(preset("tiny", hidden_size=256, expand_ratio=64, backend="triton", **overrides))
    with torch.no_grad():
        triton_model.lower_bounds.normal_(0, 1)
    reference = HGRN2LM(triton_model.config.replace(backend="chunk_torch"))
    reference.load_state_dict(triton_model.state_dict())
    return triton_model.cuda(), reference.cuda()


def loss_and_grads(model: HGRN2LM, tokens: torch.Tensor, autocast: bool):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return logits.float(), {name: p.grad.float().clone() for name, p in model.named_parameters()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("autocast, tolerance", [(False, 1e-4), (True, 3e-2)])
def test_triton_backend_matches_reference_forward_and_backward(autocast, tolerance):
    ours, reference = model_pair()
    tokens = torch.randint(0, ours.config.vocab_size, (4, 301), device="cuda")
    logits, grads = loss_and_grads(ours, tokens, autocast)
    ref_logits, ref_grads = loss_and_grads(reference, tokens, autocast)
    assert relative_error(logits, ref_logits) <= tolerance
    for name, grad in grads.items():
        assert relative_error(grad, ref_grads[name]) <= tolerance, name


def test_graph_captured_generation_equals_eager():
    ours, _ = model_pair()
    prompt = torch.randint(0, ours.config.vocab_size, (3, 17), device="cuda")
    eager = ours.generate(prompt, 24, temperature=0)
    graphed = ours.generate(prompt, 24, temperature=0, use_cuda_graph=True)
    assert torch.equal(eager, graphed)
    (captured,) = generation._GRAPHED_STEPS[ours].values()
    other_prompt = torch.randint(0, ours.config.vocab_size, (3, 9), device="cuda")
    again = ours.generate(other_prompt, 24, temperature=0, use_cuda_graph=True)  # the cached graph, new state
    assert list(generation._GRAPHED_STEPS[ours].values()) == [captured]
    assert torch.equal(again, ours.generate(other_prompt, 24, temperature=0))
    with torch.no_grad():
        logits = ours(graphed[:, :-1])
    assert (logits[:, 16:].argmax(-1) == graphed[:, 17:]).float().mean().item() >= 0.95

"""The memory-lean RMSNorm and swish-product functions against plain autograd of the same formulas."""

import pytest
import torch
import torch.nn.functional as F

from hgrn2.fused import linear_cross_entropy_sum, rms_norm, swish_product


def plain_rms_norm(x, weight, eps):
    """The formula the model used before hgrn2.fused (fp32 arithmetic for bf16 and fp32 inputs)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def plain_swish_product(gate, up):
    return F.silu(gate) * up


def saved_bytes(fn, *inputs, ignore=()) -> int:
    """Bytes of the tensors autograd keeps for the backward, those sharing storage with ``ignore`` aside."""
    seen, total = {t.untyped_storage().data_ptr() for t in ignore}, 0

    def pack(tensor):
        nonlocal total
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    return total


def test_gradcheck_float64():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-6), (x, weight))
    gate, up = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swish_product, (gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_values_and_gradients_as_plain_autograd(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 7, 64) * 3).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(64)).requires_grad_()
    gate, up = (torch.randn(2, 7, 96).to(dtype).requires_grad_() for _ in range(2))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for fused, plain, inputs in ((lambda a, w: rms_norm(a, w, 1e-6), lambda a, w: plain_rms_norm(a, w, 1e-6),
                                  (x, weight)), (swish_product, plain_swish_product, (gate, up))):
        out = fused(*inputs)
        expected = plain(*inputs)
        assert torch.equal(out, expected)  # the same operations in the same order
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, inputs, grad)
        want = torch.autograd.grad(expected, inputs, grad)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype
            assert ((a.double() - b.double()).norm() / b.double().norm()).item() <= tol


def test_saves_only_the_inputs():
    x = torch.randn(4, 32, 256, dtype=torch.bfloat16)
    weight = torch.ones(256, requires_grad=True)
    gate, up = (torch.randn(4, 32, 512, dtype=torch.bfloat16) for _ in range(2))
    # intermediate tensors (not leaves): what a layer's input is inside the model
    inputs = [t.clone().requires_grad_() * 1 for t in (x, gate, up)]
    x_in, gate_in, up_in = inputs
    rows = 4 * 32
    norm_bytes = saved_bytes(lambda a: rms_norm(a, weight, 1e-6), x_in, ignore=[weight])
    assert norm_bytes == x.nbytes + rows * 4  # x and one fp32 1/rms per row
    assert saved_bytes(lambda a: plain_rms_norm(a, weight, 1e-6), x_in, ignore=[weight]) >= 2 * x.numel() * 4
    assert saved_bytes(swish_product, gate_in, up_in) == gate.nbytes + up.nbytes
    assert saved_bytes(plain_swish_product, gate_in, up_in) == 3 * gate.nbytes


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_matches_materialised_logits(autocast):
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 48, requires_grad=True)
    weight = (0.1 * torch.randn(500, 48)).requires_grad_()
    labels = torch.randint(0, 500, (3, 37))
    labels[0, :5] = -100  # not counted
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = linear_cross_entropy_sum(hidden, weight, labels, chunk_rows=16)  # 111 rows: a partial chunk
            else:
                logits = hidden @ weight.T
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        results.append((loss.detach(), *torch.autograd.grad(loss * 0.5, (hidden, weight))))
    tol = 1e-2 if autocast else 1e-5
    for got, want in zip(results[0], results[1], strict=True):
        assert got.dtype == want.dtype
        assert ((got.double() - want.double()).norm() / want.double().norm()).item() <= tol
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        # evaluation: the same loss, no gradients formed
        assert torch.equal(linear_cross_entropy_sum(hidden, weight, labels, chunk_rows=16), results[0][0])


def test_model_loss_with_labels_equals_cross_entropy_of_its_logits():
    from hgrn2 import HGRN2LM, preset

    torch.manual_seed(0)
    model = HGRN2LM(preset("tiny", hidden_size=64, num_layers=2, expand_ratio=16))
    tokens = torch.randint(0, model.config.vocab_size, (2, 25))
    logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    loss = model(tokens[:, :-1], labels=tokens[:, 1:], loss_chunk_rows=7)
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    with pytest.raises(ValueError, match="labels"):
        model(tokens[:, :-1], labels=tokens[:, 1:], return_state=True)

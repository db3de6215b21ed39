"""The HGRN2 model against its own definitions: recurrence forms, recurrent inference, presets, checkpoints."""

import subprocess
import sys

import pytest
import torch

from hgrn2 import HGRN2LM, PRESETS, HGRN2Config, load_checkpoint, param_count, preset, save_checkpoint
from kernels.hgrn2.naive import hgrn2_chunk_torch, hgrn2_recurrent_reference


def random_model(backend: str = "chunk_torch", seed: int | None = None, **overrides) -> HGRN2LM:
    if seed is not None:
        torch.manual_seed(seed)
    model = HGRN2LM(preset("tiny", backend=backend, **overrides))
    with torch.no_grad():  # Γ is zero at init; make the lower bounds matter
        model.lower_bounds.normal_(0, 1)
        for layer in model.layers:
            layer.attn.g_norm.weight.uniform_(0.5, 1.5)
    return model.eval()


def random_gates(batch, seq_len, heads, dim, dtype=torch.float64):
    q = torch.randn(batch, seq_len, heads, dim, dtype=dtype)
    f_logit = torch.randn(batch, seq_len, heads, dim, dtype=dtype) * 3
    i = torch.randn(batch, seq_len, heads, dim, dtype=dtype)
    return q, f_logit, i


def test_parallel_forward_matches_step_loop():
    model = random_model(seed=None)
    tokens = torch.randint(0, model.config.vocab_size, (3, 300))
    with torch.no_grad():
        parallel = model(tokens)
    state = model.init_state(3)
    stepped = torch.stack([model.step(tokens[:, t], state)[0] for t in range(tokens.shape[1])], 1)
    assert (parallel - stepped).abs().max().item() <= 1e-5


def test_chunk_backend_matches_naive_backend():
    model = random_model("chunk_torch")
    reference = HGRN2LM(model.config.replace(backend="naive")).eval()
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, model.config.vocab_size, (2, 70))
    with torch.no_grad():
        assert (model(tokens) - reference(tokens)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_recurrence_matches_step_recurrence_with_gradients(with_state):
    q, f_logit, i = random_gates(2, 45, 3, 8)
    bound = torch.rand(3, 8, dtype=torch.float64)
    state = torch.randn(2, 3, 8, 8, dtype=torch.float64) if with_state else None
    inputs = [t.requires_grad_() for t in (q, f_logit, i, bound)]
    outputs = {}
    for name, fn in (("chunk", hgrn2_chunk_torch), ("step", hgrn2_recurrent_reference)):
        out, final = fn(*inputs, initial_state=state, output_final_state=True)
        grads = torch.autograd.grad((out * out.detach().sin()).sum() + final.square().sum(), inputs)
        outputs[name] = (out, final, *grads)
    for chunked, stepped in zip(outputs["chunk"], outputs["step"], strict=True):
        torch.testing.assert_close(chunked, stepped, rtol=1e-10, atol=1e-10)


def test_reference_recurrence_gradcheck():
    q, f_logit, i = random_gates(1, 6, 2, 3)
    bound = torch.rand(2, 3, dtype=torch.float64)
    state = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, f_logit, i, bound, state))

    def run(q, f_logit, i, bound, state):
        return hgrn2_recurrent_reference(q, f_logit, i, bound, initial_state=state, output_final_state=True)

    assert torch.autograd.gradcheck(run, inputs)
    assert torch.autograd.gradcheck(lambda *args: hgrn2_chunk_torch(*args[:4], initial_state=args[4])[0], inputs)


def test_packed_sequences_reset_state_at_boundaries():
    model = random_model()
    lengths = [7, 30, 19]
    documents = [torch.randint(0, model.config.vocab_size, (1, n)) for n in lengths]
    cu_seqlens = torch.tensor([0, 7, 37, 56])
    with torch.no_grad():
        packed = model(torch.cat(documents, 1), cu_seqlens=cu_seqlens)
        separate = torch.cat([model(doc) for doc in documents], 1)
    assert (packed - separate).abs().max().item() <= 1e-5


def test_step_after_prefill_equals_parallel_logits():
    model = random_model()
    tokens = torch.randint(0, model.config.vocab_size, (2, 41))
    with torch.no_grad():
        full = model(tokens)
        _, state = model(tokens[:, :40], state=model.init_state(2), return_state=True)
    logits, _ = model.step(tokens[:, 40], state)
    assert (logits - full[:, 40]).abs().max().item() <= 1e-5


def test_generate_is_deterministic_with_a_seed():
    model = random_model()
    prompt = torch.randint(0, model.config.vocab_size, (2, 12))
    options = dict(temperature=0.9, top_k=40, top_p=0.95, seed=123)
    first = model.generate(prompt, 16, **options)
    assert first.shape == (2, 28) and torch.equal(first[:, :12], prompt)
    assert torch.equal(first, model.generate(prompt, 16, **options))
    assert not torch.equal(first, model.generate(prompt, 16, **{**options, "seed": 7}))


def test_greedy_generation_follows_the_parallel_argmax():
    model = random_model()
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))
    generated = model.generate(prompt, 6, temperature=0)
    with torch.no_grad():
        logits = model(generated[:, :-1])
    assert torch.equal(logits[:, 8:].argmax(-1), generated[:, 9:])


def test_generation_stops_rows_at_eos():
    model = random_model()
    prompt = torch.randint(3, model.config.vocab_size, (3, 5))
    out = model.generate(prompt, 30, temperature=1.5, seed=0, eos_token_id=2)
    new = out[:, 5:]
    for row in new:
        hits = (row == 2).nonzero()
        if len(hits):
            assert (row[hits[0, 0] :] == 2).all()


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_equals_the_instantiated_model(name):
    for tied in (False, True):
        config = preset(name, tie_word_embeddings=tied)
        with torch.device("meta"):
            model = HGRN2LM(config)
        assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_paper_presets():
    shapes = {name: (preset(name).num_layers, preset(name).hidden_size) for name in ("150m", "385m", "1b", "3b")}
    assert shapes == {"150m": (15, 768), "385m": (26, 1024), "1b": (18, 2048), "3b": (36, 2560)}
    assert all(preset(name).expand_ratio == 128 for name in shapes)
    assert preset("1b").mlp_size == 5632  # 256 * ceil(int(2048 * 8/3) / 256)


def test_initialisation():
    model = HGRN2LM(preset("tiny"))
    assert torch.count_nonzero(model.lower_bounds) == 0
    assert abs(model.embeddings.weight.std().item() - 0.02) < 2e-3
    assert abs(model.layers[0].attn.q_proj.weight.std().item() - 0.02) < 2e-3
    assert torch.equal(model.layers[0].attn.g_norm.weight, torch.ones(128))


def test_lower_bounds_are_cumax_over_layers():
    model = random_model()
    betas = model.lower_bound_values()
    assert betas[0] is None
    stacked = torch.stack(betas[1:])
    assert (stacked > 0).all() and (stacked < 1).all()
    assert (stacked[1:] >= stacked[:-1]).all()


def test_checkpoint_round_trip(tmp_path):
    model = random_model(tie_word_embeddings=True)
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 20))
    assert loaded.lm_head.weight is loaded.embeddings.weight
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))


def test_importing_transformers_beside_our_kernels_package():
    code = (
        "import kernels, kernels.hgrn2, transformers\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "import torch\n"
        "config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2, vocab_size=50)\n"
        "model = AutoModelForCausalLM.from_config(config)\n"
        "print(model(torch.randint(0, 50, (1, 5))).logits.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 5, 50])" in result.stdout


# Bad input: every error names the problem.


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown HGRN2 preset 'huge'.*tiny"):
        preset("huge")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_size=100, expand_ratio=32), r"hidden_size \(100\) must be divisible by .*expand_ratio \(32\)"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer"),
        (dict(hidden_act="gelu"), "hidden_act must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(eos_token_id=9000), r"eos_token_id \(9000\) is outside the vocabulary"),
        (dict(norm_eps=0.0), "norm_eps must be positive"),
    ],
)
def test_inconsistent_config_values(changes, message):
    with pytest.raises(ValueError, match=message):
        HGRN2Config(**{**PRESETS["tiny"], **changes})


def test_unknown_config_field():
    with pytest.raises(ValueError, match="unknown HGRN2Config field.*hidden_dim"):
        HGRN2Config.from_dict({"hidden_dim": 12})


def test_token_ids_out_of_range():
    model = random_model()
    with pytest.raises(ValueError, match="token id 8192 is out of range for vocab_size 8192"):
        model(torch.tensor([[1, 2, 8192]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        model.step(torch.tensor([-1]), model.init_state(1))


def test_step_rejects_a_state_of_the_wrong_shape():
    model = random_model()
    with pytest.raises(ValueError, match=r"state must have shape \(4, 2, 4, 32, 32\)"):
        model.step(torch.tensor([1, 2]), model.init_state(3))


def test_mismatched_checkpoint(tmp_path):
    save_checkpoint(random_model(), tmp_path)
    config_file = tmp_path / "model_config.json"
    config_file.write_text(config_file.read_text().replace('"num_layers": 4', '"num_layers": 5'))
    with pytest.raises(ValueError, match="missing tensor 'layers.4.attn.f_proj.weight'"):
        load_checkpoint(tmp_path)
    config_file.write_text(config_file.read_text().replace('"num_layers": 5', '"num_layers": 4'))
    config_file.write_text(config_file.read_text().replace('"hidden_ratio": 4', '"hidden_ratio": 2'))
    with pytest.raises(ValueError, match=r"'layers.0.mlp.gate_proj.weight' has shape \(512, 128\), expected"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json is missing"):
        load_checkpoint(tmp_path)

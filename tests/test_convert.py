"""Conversion to and from fla's HGRN2ForCausalLM, checked against fla itself.

On a CPU, fla's Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1).
"""

import json
import os

import pytest
import torch

from hgrn2 import HGRN2LM, preset, save_checkpoint
from hgrn2.convert import from_hf, hf_to_checkpoint, main, to_hf, verify_export

fla_models = pytest.importorskip("fla.models")
if os.environ.get("TRITON_INTERPRET") == "1":
    from hgrn2 import fla_cpu

    fla_cpu.enable()

TOLERANCE = 1e-4


def random_model(**overrides) -> HGRN2LM:
    model = HGRN2LM(preset("tiny", vocab_size=512, num_layers=3, **overrides))
    with torch.no_grad():
        model.lower_bounds.normal_(0, 1)
        for layer in model.layers:
            layer.attn.g_norm.weight.uniform_(0.5, 1.5)
            layer.mlp_norm.weight.uniform_(0.5, 1.5)
    return model.eval()


def fla_logits(hf_dir, tokens):
    model = fla_models.HGRN2ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seq_len", [40, 100])  # fla: <= 64 tokens take its recurrent kernel, longer chunk_gla
def test_export_loads_in_fla_with_our_logits(tmp_path, tied, seq_len):
    model = random_model(tie_word_embeddings=tied)
    save_checkpoint(model, tmp_path / "ckpt")
    to_hf(tmp_path / "ckpt", tmp_path / "hf", verify=False)
    tokens = torch.randint(0, 512, (2, seq_len))
    with torch.no_grad():
        ours = model(tokens)
    assert (fla_logits(tmp_path / "hf", tokens) - ours).abs().max().item() <= TOLERANCE


def test_fla_checkpoint_converts_back_with_the_same_logits(tmp_path):
    config = fla_models.HGRN2Config(hidden_size=128, num_hidden_layers=3, expand_ratio=32, vocab_size=512)
    theirs = fla_models.HGRN2ForCausalLM(config).eval()
    with torch.no_grad():
        theirs.model.lower_bounds.normal_(0, 1)
    theirs.save_pretrained(tmp_path / "hf")
    hf_to_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    ours = from_hf(tmp_path / "hf").eval()
    tokens = torch.randint(0, 512, (2, 80))
    with torch.no_grad():
        assert (theirs(tokens).logits - ours(tokens)).abs().max().item() <= TOLERANCE
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_to_hf_command_checks_itself(tmp_path, capsys):
    save_checkpoint(random_model(), tmp_path / "ckpt")
    assert main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["status"] == "passed"
    assert report["verification"]["max_abs_logit_diff"] <= TOLERANCE


def test_self_check_fails_loudly_on_a_wrong_export(tmp_path):
    save_checkpoint(random_model(), tmp_path / "ckpt")
    to_hf(tmp_path / "ckpt", tmp_path / "hf", verify=False)
    save_checkpoint(random_model(), tmp_path / "other")  # same shapes, other weights
    with pytest.raises(RuntimeError, match="export check FAILED: fla's logits differ from ours by"):
        verify_export(tmp_path / "other", tmp_path / "hf")


def test_from_hf_refuses_mismatched_directories(tmp_path):
    save_checkpoint(random_model(), tmp_path / "ckpt")
    hf = tmp_path / "hf"
    to_hf(tmp_path / "ckpt", hf, verify=False)
    config = json.loads((hf / "config.json").read_text())

    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.3.attn.q_proj.weight'"):
        from_hf(hf)
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(128, 512\)"):
        from_hf(hf)
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama', expected 'hgrn2'"):
        from_hf(hf)
    (hf / "config.json").write_text(json.dumps({**config, "use_short_conv": True}))
    with pytest.raises(ValueError, match="use_short_conv=True is not supported"):
        from_hf(hf)
    (hf / "model.safetensors").unlink()
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        from_hf(hf)

"""Conversion between our checkpoints and the Hugging Face format of fla's ``HGRN2ForCausalLM``.

``hgrn2-convert to-hf CHECKPOINT_DIR OUT_DIR`` writes ``config.json`` + ``model.safetensors`` (and the
tokenizer files) that ``fla.models.HGRN2ForCausalLM.from_pretrained(OUT_DIR)`` loads, then checks itself:
when fla is installed it loads what it wrote, runs both models on the same random tokens and fails if the
logits differ by more than the tolerance. ``hgrn2-convert from-hf HF_DIR CHECKPOINT_DIR`` goes back.

Parameter names are fla's with the ``model.`` prefix removed (the LM head keeps its name).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hgrn2.checkpoint import (
    CONFIG_FILE,
    check_state_dict,
    load_checkpoint,
    load_model_weights,
    model_state_dict,
    save_checkpoint,
    write_json_atomic,
)
from hgrn2.config import HGRN2Config
from hgrn2.model import HGRN2LM

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
VERIFY_TOLERANCE = 1e-4  # max |logit difference| in fp32, from the parity bar
LATEST_POINTER = "latest"  # a trainer's save directory names its newest complete checkpoint here
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def hf_config(config: HGRN2Config, dtype: torch.dtype) -> dict:
    """fla's ``HGRN2Config`` fields for our configuration."""
    if config.gate_norm_eps != 1e-5:
        raise ValueError(f"fla's HGRN2 fixes the output-norm eps at 1e-5; this model uses {config.gate_norm_eps}")
    return {
        "architectures": ["HGRN2ForCausalLM"],
        "model_type": "hgrn2",
        "attn_mode": "chunk",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "expand_ratio": config.expand_ratio,
        "num_heads": config.num_heads,
        "vocab_size": config.vocab_size,
        "use_lower_bound": config.use_lower_bound,
        "hidden_ratio": config.hidden_ratio,
        "intermediate_size": config.mlp_size,
        "hidden_act": config.hidden_act,
        "norm_eps": config.norm_eps,
        "elementwise_affine": True,
        "use_short_conv": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def config_from_hf(values: dict, source: str) -> HGRN2Config:
    """Our configuration for an fla HGRN2 ``config.json``; refuses features our model does not have."""
    if values.get("model_type") != "hgrn2":
        raise ValueError(f"{source}: model_type is {values.get('model_type')!r}, expected 'hgrn2'")
    unsupported = {
        "use_short_conv": (values.get("use_short_conv", False), False),
        "elementwise_affine": (values.get("elementwise_affine", True), True),
        "attnres_block_size": (values.get("attnres_block_size"), None),
        "attn": (values.get("attn"), None),
    }
    for key, (found, wanted) in unsupported.items():
        if found != wanted:
            raise ValueError(f"{source}: {key}={found!r} is not supported (our HGRN2 needs {wanted!r})")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key not in values:
            raise ValueError(f"{source}: required key {key!r} is missing")
    hidden = values["hidden_size"]
    expand_ratio = values.get("expand_ratio") or (hidden // values["num_heads"] if values.get("num_heads") else None)
    if expand_ratio is None:
        raise ValueError(f"{source}: one of 'expand_ratio' or 'num_heads' is required")
    if values.get("num_heads") not in (None, hidden // expand_ratio):
        raise ValueError(
            f"{source}: num_heads={values['num_heads']} disagrees with "
            f"hidden_size/expand_ratio={hidden // expand_ratio}"
        )
    return HGRN2Config(
        vocab_size=values["vocab_size"],
        hidden_size=hidden,
        num_layers=values["num_hidden_layers"],
        expand_ratio=expand_ratio,
        hidden_ratio=values.get("hidden_ratio") or 4,
        intermediate_size=values.get("intermediate_size"),
        hidden_act=values.get("hidden_act", "swish"),
        use_lower_bound=values.get("use_lower_bound", True),
        norm_eps=values.get("norm_eps", 1e-6),
        tie_word_embeddings=values.get("tie_word_embeddings", False),
        initializer_range=values.get("initializer_range", 0.02),
        max_position_embeddings=values.get("max_position_embeddings", 2048),
        bos_token_id=values.get("bos_token_id"),
        eos_token_id=values.get("eos_token_id"),
        pad_token_id=values.get("pad_token_id"),
    )


def resolve_checkpoint_dir(directory: str | Path) -> Path:
    """A checkpoint directory, or a trainer's save directory whose ``latest`` file names one."""
    directory = Path(directory)
    pointer = directory / LATEST_POINTER
    if not (directory / CONFIG_FILE).is_file() and pointer.is_file():
        return directory / pointer.read_text().strip()
    return directory


def _find_tokenizer(checkpoint_dir: Path, tokenizer: str | Path | None) -> Path | None:
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist")
        return path
    shipped = checkpoint_dir / "tokenizer.model"
    return shipped if shipped.is_file() else None


def to_hf(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    dtype: str = "float32",
    verify: bool = True,
) -> dict:
    """Export a checkpoint for fla's ``HGRN2ForCausalLM``; returns a report (files, verification)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
    model = load_checkpoint(checkpoint_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {to_hf_name(name): t.to(DTYPES[dtype]) for name, t in model_state_dict(model).items()}
    save_file(tensors, str(out_dir / HF_WEIGHTS), metadata={"format": "pt"})
    write_json_atomic(out_dir / "config.json", hf_config(model.config, DTYPES[dtype]))
    report: dict = {"out_dir": str(out_dir), "tensors": len(tensors), "dtype": dtype}
    tokenizer_path = _find_tokenizer(checkpoint_dir, tokenizer)
    if tokenizer_path is not None:
        from data_tools.tokenizer import write_hf_tokenizer_files

        write_hf_tokenizer_files(tokenizer_path, out_dir)
        report["tokenizer"] = str(tokenizer_path)
    if verify:
        report["verification"] = verify_export(checkpoint_dir, out_dir)
    return report


def _read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    single, index = hf_dir / HF_WEIGHTS, hf_dir / HF_INDEX
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(hf_dir / shard)))
        return tensors
    if any(hf_dir.glob("*.bin")):
        raise ValueError(f"{hf_dir} holds pickled .bin weights; only safetensors are read (no code is unpickled)")
    raise FileNotFoundError(f"{hf_dir} has no {HF_WEIGHTS} or {HF_INDEX}")


def from_hf(hf_dir: str | Path) -> HGRN2LM:
    """Our model with the weights of an fla HGRN2 Hugging Face directory (fp32)."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    config = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    found = _read_hf_tensors(hf_dir)
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # fla may store the tied copy; ours is the embedding
    model = HGRN2LM(config)
    expected = {to_hf_name(name): t for name, t in model_state_dict(model).items()}
    check_state_dict(expected, found, str(hf_dir))
    tensors = {from_hf_name(name): t.float() for name, t in found.items()}
    return load_model_weights(model, tensors, str(hf_dir))


def hf_to_checkpoint(hf_dir: str | Path, checkpoint_dir: str | Path) -> Path:
    model = from_hf(hf_dir)
    out = save_checkpoint(model, checkpoint_dir)
    tokenizer = Path(hf_dir) / "tokenizer.model"
    if tokenizer.is_file():
        (Path(checkpoint_dir) / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return out


def compare_with_fla(checkpoint_dir: Path, hf_dir: Path, batch: int = 2, seq_len: int = 32, seed: int = 0) -> float:
    """Max |logit difference| between fla's model loaded from ``hf_dir`` and ours, on random tokens (fp32)."""
    from fla.models import HGRN2ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    stored = json.loads((hf_dir / "config.json").read_text()).get("torch_dtype", "float32")
    ours = load_checkpoint(checkpoint_dir)
    with torch.no_grad():  # round to what was exported, so that both models hold the same numbers
        for tensor in ours.state_dict().values():
            tensor.copy_(tensor.to(DTYPES[stored]).float())
    ours = ours.to(device).eval()
    theirs = HGRN2ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ours.config.vocab_size, (batch, seq_len), generator=generator).to(device)
    with torch.no_grad():
        difference = (theirs(tokens).logits.float() - ours(tokens).float()).abs().max().item()
    return difference


def verify_export(checkpoint_dir: Path, hf_dir: Path) -> dict:
    """Compare fla's logits with ours; on a CPU fla runs under Triton's interpreter in a subprocess."""
    try:
        import fla  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "fla is not installed (pip install flash-linear-attention)"}
    if torch.cuda.is_available():
        difference = compare_with_fla(checkpoint_dir, hf_dir)
    else:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        command = [sys.executable, "-m", "hgrn2.convert", "compare", str(checkpoint_dir), str(hf_dir)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"fla could not check the export:\n{result.stderr[-3000:]}")
        difference = float(result.stdout.strip().splitlines()[-1])
    if not difference <= VERIFY_TOLERANCE:
        raise RuntimeError(
            f"export check FAILED: fla's logits differ from ours by {difference:.3e} (> {VERIFY_TOLERANCE:.0e}); "
            f"{hf_dir} does not compute what the checkpoint computes"
        )
    return {"status": "passed", "max_abs_logit_diff": difference, "tolerance": VERIFY_TOLERANCE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hgrn2-convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("to-hf", help="checkpoint → Hugging Face directory for fla's HGRN2ForCausalLM")
    export.add_argument("checkpoint_dir")
    export.add_argument("out_dir")
    export.add_argument("--tokenizer", help="sentencepiece .model to ship beside the model")
    export.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    export.add_argument("--no-verify", action="store_true", help="skip loading the export with fla")
    load = commands.add_parser("from-hf", help="Hugging Face directory (fla HGRN2) → checkpoint")
    load.add_argument("hf_dir")
    load.add_argument("checkpoint_dir")
    compare = commands.add_parser("compare", help="print max |logit diff| of fla vs ours (used by to-hf)")
    compare.add_argument("checkpoint_dir")
    compare.add_argument("hf_dir")
    args = parser.parse_args(argv)
    if args.command == "to-hf":
        report = to_hf(args.checkpoint_dir, args.out_dir, args.tokenizer, args.dtype, not args.no_verify)
        print(json.dumps(report, indent=2))
    elif args.command == "from-hf":
        print(f"wrote {hf_to_checkpoint(args.hf_dir, args.checkpoint_dir)}")
    else:
        if os.environ.get("TRITON_INTERPRET") == "1":
            from hgrn2 import fla_cpu

            fla_cpu.enable()
        print(compare_with_fla(Path(args.checkpoint_dir), Path(args.hf_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

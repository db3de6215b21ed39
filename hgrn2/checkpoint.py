"""Model checkpoints on disk: ``model_config.json`` + ``model.safetensors`` in one directory.

The trainer writes its model weights in this same layout (beside its optimizer and progress files), so
``load_checkpoint`` opens any training checkpoint. Nothing here unpickles: tensors are safetensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hgrn2.config import HGRN2Config
from hgrn2.model import HGRN2LM

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"


def model_state_dict(model: HGRN2LM) -> dict[str, torch.Tensor]:
    """The model's tensors, contiguous, with a tied LM head stored once (as the embedding)."""
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming every missing, unexpected or mis-shaped tensor of ``found``."""
    problems = [f"missing tensor {name!r}" for name in sorted(set(expected) - set(found))]
    problems += [f"unexpected tensor {name!r}" for name in sorted(set(found) - set(expected))]
    for name in sorted(set(expected) & set(found)):
        if tuple(expected[name].shape) != tuple(found[name].shape):
            problems.append(
                f"tensor {name!r} has shape {tuple(found[name].shape)}, expected {tuple(expected[name].shape)}"
            )
    if problems:
        raise ValueError(f"{source} does not match the model configuration: " + "; ".join(problems))


def load_model_weights(model: HGRN2LM, tensors: dict[str, torch.Tensor], source: str) -> HGRN2LM:
    expected = model_state_dict(model)
    check_state_dict(expected, tensors, source)
    with torch.no_grad():
        for name, target in model.state_dict().items():
            if name in tensors:
                target.copy_(tensors[name])
    return model


def write_json_atomic(path: Path, values: dict) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(values, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(handle.name, path)


def save_checkpoint(model: HGRN2LM, directory: str | Path) -> Path:
    """Write the model's configuration and weights into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_state_dict(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json_atomic(directory / CONFIG_FILE, model.config.to_dict())
    return directory


def load_config(directory: str | Path) -> HGRN2Config:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no HGRN2 checkpoint in {directory}: {CONFIG_FILE} is missing")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return HGRN2Config.from_dict(values)


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides
) -> HGRN2LM:
    """The model saved in ``directory``; ``overrides`` change non-structural config fields (e.g. backend)."""
    directory = Path(directory)
    config = load_config(directory)
    if overrides:
        config = config.replace(**overrides)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no HGRN2 checkpoint in {directory}: {WEIGHTS_FILE} is missing")
    model = HGRN2LM(config)
    load_model_weights(model, load_file(str(weights)), str(weights))
    return model.to(device=device, dtype=dtype)

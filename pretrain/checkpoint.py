"""Training checkpoints: atomic, layout-independent, loaded without unpickling.

    SAVE_DIR/step_00001000/
        model_config.json, model.safetensors   hgrn2.save_checkpoint's layout (full fp32 weights)
        optimizer.safetensors                  exp_avg.<param>, exp_avg_sq.<param>, step.<param>
        trainer_state.json                     step, consumed_samples, schedule, skip counters,
                                               config hash, Python/NumPy RNG states
        rng.safetensors                        torch CPU (and CUDA) generator states
        config.yaml                            the resolved training config
        tokenizer.model                        the sentencepiece model, when the config names one
    SAVE_DIR/latest                            the name of the newest complete checkpoint

A checkpoint is written into ``SAVE_DIR/.tmp-step_…``, every file and the directory fsynced, then
renamed to ``step_…``; only then is ``latest`` replaced (write a temporary file, fsync, rename). A
process killed at any moment leaves ``latest`` naming a complete checkpoint. The newest ``keep``
checkpoints are kept. ``hgrn2.load_checkpoint``/``hgrn2-convert to-hf`` read a step directory, or
SAVE_DIR itself through ``latest``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pretrain.engine import TrainingEngine

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
CONFIG_COPY = "config.yaml"
TOKENIZER_COPY = "tokenizer.model"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            _fsync_path(path)
    _fsync_path(directory)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


# ---------------------------------------------------------------------------------------------------
# RNG states: tensors in safetensors, the rest in JSON


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    return tensors


def rng_json() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }


def restore_rng(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


# ---------------------------------------------------------------------------------------------------
# Saving


def save(
    engine: TrainingEngine,
    save_dir: Path,
    trainer_state: dict[str, Any],
    config_yaml: str,
    tokenizer: Path | None,
    keep: int,
) -> Path:
    """Write checkpoint ``step_{trainer_state['step']}`` atomically and point ``latest`` at it."""
    step = int(trainer_state["step"])
    final = save_dir / step_dir_name(step)
    tmp = save_dir / f"{TMP_PREFIX}{final.name}"
    if engine.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a write that was killed
        tmp.mkdir()
    engine.barrier()
    engine.save(tmp)
    engine.barrier()
    if engine.is_main:
        state = {**trainer_state, "format_version": FORMAT_VERSION, "rng": rng_json(), "saved_at": time.time()}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        save_file(rng_tensors(), str(tmp / RNG_FILE))
        (tmp / CONFIG_COPY).write_text(config_yaml)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_COPY)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved before (a resumed run): replace it, never half of it
            stale = save_dir / f"{TMP_PREFIX}old-{final.name}"
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        _fsync_path(save_dir)
        write_text_atomic(save_dir / LATEST, final.name + "\n")
        prune(save_dir, keep)
    engine.barrier()
    return final


def complete_checkpoints(save_dir: Path) -> list[Path]:
    """Complete step directories, oldest first (temporary ones are never listed)."""
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.glob("step_*") if p.is_dir() and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune(save_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (and always the one ``latest`` names); drop stale temporaries."""
    latest = read_latest(save_dir)
    for old in complete_checkpoints(save_dir)[:-keep]:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)
    for stale in save_dir.glob(f"{TMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Loading


def read_latest(save_dir: Path) -> Path | None:
    pointer = save_dir / LATEST
    if not pointer.is_file():
        return None
    target = save_dir / pointer.read_text().strip()
    if not (target / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {target.name}, which is not a complete checkpoint")
    return target


def resolve_resume(resume: str, save_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` (newest in save_dir, if any), ``none``, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return read_latest(save_dir)
    path = Path(resume)
    if (path / LATEST).is_file() and not (path / TRAINER_STATE).is_file():
        return read_latest(path)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume}: no {TRAINER_STATE} there (not a training checkpoint)")
    return path


def load(engine: TrainingEngine, directory: Path) -> dict[str, Any]:
    """Restore the engine (model, optimizer) and the RNGs; returns the trainer state to continue from."""
    state = json.loads((directory / TRAINER_STATE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {state.get('format_version')}, expected {FORMAT_VERSION}")
    engine.load(directory)
    restore_rng(load_file(str(directory / RNG_FILE)), state["rng"])
    return state

"""What the loop reports: FLOPs and MFU, memory, the console line, TensorBoard, metrics.jsonl."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hgrn2.config import HGRN2Config, param_count

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity), by device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0}


def flops_per_token(config: HGRN2Config) -> tuple[float, str]:
    """Training FLOPs per token (forward + backward) and the formula, for the log.

    6·N for the matmuls (N = parameters less the input embedding, which is a lookup), plus the
    recurrence: per layer and token, the state update and read-out cost 2·d·n each forward (n = head
    dim), ×3 for forward + backward: 12·L·d·n.
    """
    n_matmul = param_count(config) - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
    recurrence = 12 * config.num_layers * config.hidden_size * config.expand_ratio
    total = 6 * n_matmul + recurrence
    formula = (f"FLOPs/token = 6·N + 12·L·d·n = 6·{n_matmul:,} + 12·{config.num_layers}·{config.hidden_size}·"
               f"{config.expand_ratio} = {total / 1e9:.3f} GFLOP (N: parameters less the input embedding)")
    return float(total), formula


def peak_flops(device: torch.device, configured_tflops: float | None, devices: int = 1) -> tuple[float | None, str]:
    """The job's peak FLOP/s (one device's × ``devices``: MFU divides the job's tokens/s by it) and its source."""
    if configured_tflops is not None:
        peak, note = configured_tflops, f"peak {configured_tflops:g} TFLOP/s (logging.peak_tflops)"
    elif device.type != "cuda":
        return None, "no MFU on the CPU (set logging.peak_tflops to get one)"
    else:
        name = torch.cuda.get_device_name(device)
        found = [tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name]
        if not found:
            return None, f"no MFU: unknown peak for {name} (set logging.peak_tflops)"
        peak, note = found[0], f"peak {found[0]:g} TFLOP/s ({name}, bf16 dense, data sheet)"
    if devices > 1:
        note += f" per device × {devices} devices"
    return peak * 1e12 * devices, note


def memory_gib(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: allocated CUDA memory, or the process's max resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "peak CUDA allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 2**20, "peak RSS"


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Reporter:
    """Console, TensorBoard and a JSON-lines file of every step; silent off the main rank."""

    def __init__(self, output_dir: Path, tensorboard_dir: Path | None, enabled: bool) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.tensorboard_dir = tensorboard_dir
        self.writer = None
        self.metrics = None

    def open(self, resumed_step: int) -> None:
        """Open the files; TensorBoard drops points after ``resumed_step`` left by a run that was killed."""
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.output_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed by close()
        if self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=resumed_step or None)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def error(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One line in metrics.jsonl (every step, so a killed run keeps its history)."""
        if self.metrics is not None:
            self.metrics.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
            self.metrics.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()

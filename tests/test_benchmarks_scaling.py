"""benchmarks/scaling.py end to end on the CPU: the driver starts every layout as the device would (one process,
or torchrun with two over gloo), interleaves the rounds and keeps each run's figures."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling.py"
TINY = ["--preset", "tiny", "--micro-batch", "2", "--seq-length", "64", "--warmup", "1"]


def run_driver(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *TINY, "--out", str(tmp_path / "scaling.json"), *extra],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_scaling_rounds_keep_every_run(tmp_path):
    done = run_driver(tmp_path, "--steps", "3", "--rounds", "2", "--layouts", "single,dp2-zero2")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "scaling.json").read_text())
    for name, world in (("single", 1), ("dp2-zero2", 2)):
        runs = saved["runs"][name]
        assert [run["round"] for run in runs] == [0, 1]
        for run in runs:
            assert run["world"] == world and len(run["step_times_s"]) == 3
            assert math.isfinite(run["final_loss"]) and run["tokens_per_s"] > 0
            assert len(run["gc_during_timed_steps"]["collections_per_generation"]) == 3
        assert saved["summary"][name]["tokens_per_s"] in saved["summary"][name]["tokens_per_s_rounds"]
    # every round starts from the same seeds: the rounds repeat the same training, only the timing differs
    losses = [run["final_loss"] for run in saved["runs"]["dp2-zero2"]]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert "% of 2× one GPU" in done.stdout


def test_scaling_refuses_an_unknown_layout(tmp_path):
    done = run_driver(tmp_path, "--layouts", "single,dp4")
    assert done.returncode != 0 and "unknown ['dp4']" in done.stderr


def load_scaling():
    spec = importlib.util.spec_from_file_location("scaling_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merged_length_counts_overlaps_once():
    merged_length = load_scaling().merged_length
    assert merged_length([]) == 0.0
    assert merged_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)


def test_step_breakdown_separates_collectives_from_compute():
    """A step of 10 ms: compute kernels for 0-4 and 3-6 ms, a collective spinning 6-9 ms, the host blocked in
    a sync 5-9 ms; times in microseconds, as the profiler gives them."""
    from torch.autograd import DeviceType

    def event(name, start, end, device_type):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device_type)

    events = [event("timed step 0", 0, 10_000, DeviceType.CPU),
              event("ampere_gemm", 0, 4_000, DeviceType.CUDA),
              event("_intra_bwd_kernel", 3_000, 6_000, DeviceType.CUDA),
              event("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 6_000, 9_000, DeviceType.CUDA),
              event("cudaStreamSynchronize", 5_000, 9_000, DeviceType.CPU),
              event("ampere_gemm", 12_000, 13_000, DeviceType.CUDA)]  # after the step: not counted
    lines = load_scaling().step_breakdown(events, 1)
    assert lines == ["step 0: 10.0 ms wall, no compute kernel 4.0 ms, in collectives 3.0 ms, "
                     "host blocked in syncs 4.0 ms"]


def test_gc_watch_counts_only_while_active():
    watch = load_scaling().GcWatch()
    try:
        gc.collect()
        assert watch.counts == [0, 0, 0]
        watch.active = True
        gc.collect()
        watch.active = False
        assert watch.counts == [0, 0, 1] and watch.seconds > 0
        gc.collect()
        assert watch.counts == [0, 0, 1]
    finally:
        gc.callbacks.remove(watch._callback)

"""launch/: two "nodes" on one machine (node ranks 0 and 1 over loopback) train the tiny config with
DP=2 through the real trainer (``hgrn2-pretrain``), matching a single-process run; the preflight refuses
wrong layouts with a message saying what to change."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# find_spec, not importorskip: importing DeepSpeed here would pick its accelerator inside the test process
if importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("megatron") is None:
    pytest.skip("needs deepspeed and megatron-core", allow_module_level=True)

from pretrain.parallel.layout import LayoutError, resolve_layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "launch.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def records(output_dir: Path, kind: str) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("kind") == kind]


def losses(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in records(output_dir, "train")}


def write_config(tmp_path: Path, name: str, output_dir: Path, **sections) -> Path:
    from pretrain.testing import tiny_config, write_synthetic_mix

    mix = tmp_path / "data" / "mix"
    if not mix.exists():
        write_synthetic_mix(tmp_path / "data")
    tree = tiny_config(mix, output_dir, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def launch(*args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(LAUNCH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_nodes_over_loopback_train_with_dp2(tmp_path):
    from pretrain.train import main as train_main

    single_dir, dist_dir = tmp_path / "single", tmp_path / "two-nodes"
    peak = {"logging": {"every": 1, "tensorboard": False, "peak_tflops": 1.0}}  # MFU on the CPU
    single_cfg = write_config(tmp_path, "single", single_dir, **peak)
    dist_cfg = write_config(tmp_path, "dp2", dist_dir, **peak)
    assert train_main(["--config", str(single_cfg)]) == 0
    port = str(free_port())
    common = ["torchrun", "--config", str(dist_cfg), "--nodes", "2", "--nproc-per-node", "1", "--cpu",
              "--master-addr", "127.0.0.1", "--master-port", port, "--wait", "120"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"node{rank}.log", "w") for rank in (0, 1)]  # noqa: SIM115
    nodes = [
        subprocess.Popen([sys.executable, str(LAUNCH), *common, "--node-rank", str(rank)], cwd=ROOT, env=env,
                         stdout=logs[rank], stderr=subprocess.STDOUT)
        for rank in (0, 1)
    ]
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
        for log in logs:
            log.close()
    output = "\n".join((tmp_path / f"node{rank}.log").read_text()[-3000:] for rank in (0, 1))
    assert codes == [0, 0], output
    assert "DP=2" in output and "master 127.0.0.1" in output
    expected, found = losses(single_dir), losses(dist_dir)
    assert sorted(found) == sorted(expected) and found, output
    worst = max(abs(found[s] - expected[s]) / abs(expected[s]) for s in expected)
    assert worst <= 1e-4, (found, expected)
    assert (dist_dir / "checkpoints" / "latest").is_file()
    # MFU divides the job's tokens/s by the peak of all its devices.
    for output_dir, devices in ((single_dir, 1), (dist_dir, 2)):
        summary = records(output_dir, "summary")[-1]
        assert summary["mfu"] == pytest.approx(summary["flops_per_token"] * summary["tokens_per_s"] / (1e12 * devices))
    assert summary["tokens_per_s_per_device"] == pytest.approx(summary["tokens_per_s"] / 2)


def test_preflight_refuses_world_not_divisible(tmp_path):
    cfg = write_config(tmp_path, "c", tmp_path / "o", parallel={"tensor": 2})
    result = launch("torchrun", "--config", str(cfg), "--nproc-per-node", "3", "--cpu", "--dry-run")
    assert result.returncode == 2
    assert "world size 3 is not divisible by parallel.tensor × parallel.pipeline" in result.stderr


def test_preflight_refuses_missing_gpus_and_unreachable_master(tmp_path):
    cfg = write_config(tmp_path, "c", tmp_path / "o")
    result = launch("torchrun", "--config", str(cfg), "--nproc-per-node", "2", "--dry-run",
                    env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and "need 2 GPUs, but 0 are visible" in result.stderr
    result = launch("torchrun", "--config", str(cfg), "--nodes", "2", "--node-rank", "1", "--nproc-per-node", "1",
                    "--cpu", "--master-port", str(free_port()), "--wait", "1")
    assert result.returncode == 2 and "not reachable" in result.stderr and "start node rank 0 first" in result.stderr


def test_dry_run_prints_resolved_commands(tmp_path):
    cfg = write_config(tmp_path, "c", tmp_path / "o")
    result = launch("slurm", "--config", str(cfg), "--nodes", "2", "--nproc-per-node", "4", "--master-addr",
                    "node001", "--dry-run", "--", "parallel.tensor=2", "batch.global_batch_size=16")
    assert result.returncode == 0, result.stderr
    assert "--node-rank 0" in result.stdout and "--node-rank 1" in result.stdout
    assert "--master-addr node001" in result.stdout and "NCCL_NVLS_ENABLE=0" in result.stdout
    assert "TP=2 PP=1 DP=4" in result.stderr
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    result = launch("deepspeed", "--config", str(cfg), "--hostfile", str(hostfile), "--cpu", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "deepspeed --hostfile" in result.stdout and "--module pretrain.train" in result.stdout


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=6, tensor=4), "world size 6 is not divisible"),
        (dict(world_size=4, tensor=4), "not divisible by parallel.tensor=4"),
        (dict(world_size=8, pipeline=8), "parallel.pipeline=8 stages but the model has only 4 layers"),
        (dict(world_size=4, pipeline=2, zero_stage=3), "Set parallel.zero_stage=1"),
        (dict(world_size=4, pipeline=2, tensor=2, tie=True), "set model.tie_word_embeddings=false"),
        (dict(world_size=2, sequence_parallel=True), "set parallel.sequence_parallel=false"),
    ],
)
def test_wrong_layouts_refused_with_what_to_change(kwargs, message):
    from hgrn2.config import HGRN2Config

    tie = kwargs.pop("tie", False)
    model = HGRN2Config(vocab_size=128, hidden_size=96, num_layers=4, expand_ratio=16, tie_word_embeddings=tie)
    with pytest.raises(LayoutError, match=message):
        resolve_layout(model_config=model, **kwargs)


def test_engine_refuses_wrong_layout_at_start(tmp_path):
    """Through the real entry point: the trainer exits at start, naming what to change."""
    cfg = write_config(tmp_path, "c", tmp_path / "o", parallel={"pipeline": 2, "zero_stage": 3})
    result = launch("torchrun", "--config", str(cfg), "--nproc-per-node", "2", "--cpu", "--skip-preflight",
                    timeout=120)
    assert result.returncode != 0
    assert "Set parallel.zero_stage=1" in result.stdout + result.stderr

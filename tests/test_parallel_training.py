"""Distributed layouts against the single-process model, on the CPU over gloo (several processes).

Each layout trains the tiny test model (d 64, 4 layers, head dim 16, vocab 131, seq 32) for 20 steps with
``pretrain.parallel.testing`` under torchrun; the first step's loss and full gathered gradients must
equal ``LocalEngine``'s at the same weights and data (fp32, rel. err ≤ 1e-5) and the 20 losses agree to
≤ 1e-4. Checkpoints saved under one layout resume under another (and in ``LocalEngine``), also with
and without sequence parallel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# find_spec, not importorskip: importing DeepSpeed here would pick its accelerator inside the test process
if importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("megatron") is None:
    pytest.skip("needs deepspeed and megatron-core", allow_module_level=True)

from pretrain.parallel.testing import reference, tiny_config  # noqa: E402

STEPS = 20
SAVE_AT = 10
ROOT = Path(__file__).resolve().parents[1]

# name: (processes, worker arguments); TP=2 and PP=2 alone run with tied word embeddings (vocabulary-sharded
# tied weight; embedding and head tied across the first and last stage), the others untied.
LAYOUTS = {
    "tp2-tied": (2, ["--tensor", "2", "--zero", "1", "--tie"]),
    # stages of 1 and 3 blocks (HGRN2_PIPELINE_PARTITION): the first stage holds only block 0, which reads no β,
    # so its copy of Γ gets no gradient of its own (the tied all-reduce must still run there)
    "pp2-tied": (2, ["--pipeline", "2", "--zero", "1", "--tie", "--partition", "1,3"]),
    "dp2-zero1": (2, ["--zero", "1"]),
    "dp2-zero2": (2, ["--zero", "2"]),
    # gradient reduction overlapped with the backward, in many small buckets (the throughput settings to try)
    "dp2-zero2-overlap": (2, ["--zero", "2", "--override", "parallel.zero_overlap_comm=true",
                              "--override", "parallel.zero_bucket_size=2000"]),
    "dp2-zero3": (2, ["--zero", "3"]),
    # DeepSpeed's own per-tensor norm and overflow loops instead of pretrain.parallel.zero_norms
    "dp2-zero2-loops": (2, ["--zero", "2", "--override", "parallel.zero_multi_tensor_checks=false"]),
    # the LM head and the loss fused in chunks of 24 tokens (hgrn2.fused) against the reference's plain loss
    "dp2-zero1-fused-loss": (2, ["--zero", "1", "--override", "run.loss_chunk_tokens=24"]),
    "tp2xdp2-zero2": (4, ["--tensor", "2", "--zero", "2"]),
    "pp2xdp2-zero1": (4, ["--pipeline", "2", "--zero", "1"]),
    "tp2xpp2-zero1": (4, ["--tensor", "2", "--pipeline", "2", "--zero", "1"]),
    # Megatron-style sequence parallel (activations between the mixers sharded along the sequence); ZeRO-2
    # reduces gradients during backward, so the norm weights' TP all-reduce must happen before DeepSpeed sees them
    "tp2-sp-zero2": (2, ["--tensor", "2", "--zero", "2", "--sequence-parallel"]),
}


def run_workers(nproc: int, args: list[str], out: Path, timeout: float = 300) -> dict:
    """torchrun (standalone: a free port) ``nproc`` workers; returns rank 0's result.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HGRN2_FORCE_CPU": "1"}
    env.pop("HGRN2_TEST_OVERRIDES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "pretrain.parallel.testing", "--out", str(out), *args,
    ]
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        tail = (error.stdout or b"")[-4000:] if isinstance(error.stdout, bytes) else (error.stdout or "")[-4000:]
        pytest.fail(f"workers timed out after {timeout}s: {' '.join(command)}\n{tail}")
    if proc.returncode != 0 or not (out / "result.json").is_file():
        log = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"workers failed (exit {proc.returncode}): {' '.join(command)}\n{log}")
    return json.loads((out / "result.json").read_text())


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class References:
    """Single-process losses of 20 steps and the first step's gradients, untied and tied (computed once)."""

    def __init__(self) -> None:
        self.cache = {}

    def get(self, tied: bool = False) -> dict:
        if tied not in self.cache:
            losses, grads = reference(tiny_config(STEPS, tie_word_embeddings=tied), STEPS)
            self.cache[tied] = {"losses": losses, "grads": grads}
        return self.cache[tied]


@pytest.fixture(scope="module")
def references():
    return References()


@pytest.fixture(scope="module")
def single(references):
    return references.get(False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Results of the layouts run so far (reused by the resume tests)."""
    return {"root": tmp_path_factory.mktemp("parallel")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, references, runs):
    from safetensors.torch import load_file

    nproc, args = LAYOUTS[name]
    single = references.get("--tie" in args)
    out = runs["root"] / name
    result = run_workers(nproc, [*args, "--steps", str(STEPS), "--save-at", str(SAVE_AT)], out)
    runs[name] = out
    assert result["world"] == nproc
    if "--partition" in args:
        assert result["stage_blocks"] == [int(n) for n in args[args.index("--partition") + 1].split(",")]
    grads = load_file(str(out / "grads.safetensors"))
    assert set(grads) == set(single["grads"]), "gathered gradients must use the single-process names"
    grad_errors = {n: rel(grads[n], g) for n, g in single["grads"].items()}
    worst = max(grad_errors, key=grad_errors.get)
    first = abs(result["losses"][0] - single["losses"][0]) / abs(single["losses"][0])
    losses = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], single["losses"], strict=True))
    print(f"{name}: first-step loss rel {first:.2e}, max grad rel {grad_errors[worst]:.2e} ({worst}), "
          f"20-step max loss rel {losses:.2e}, {result['seconds']:.1f}s")
    assert first <= 1e-5
    assert grad_errors[worst] <= 1e-5, f"{worst}: {grad_errors[worst]:.3e}"
    assert losses <= 1e-4, (result["losses"], single["losses"])
    assert not any(result["skipped"])
    assert single["losses"][-1] < single["losses"][0] - 0.5, "the test model should learn"
    if "parallel.zero_multi_tensor_checks=false" in args:
        assert "zero_norms" not in result
    elif args[args.index("--zero") + 1] in ("1", "2"):
        # ZeRO-1/2's gradient norm and overflow check as multi-tensor kernels (pretrain.parallel.zero_norms)
        checks = result["zero_norms"]
        for ours, deepspeed in checks["norms"]:
            assert ours == pytest.approx(deepspeed, rel=1e-6)
        assert checks["overflow"] == [False, False, True, True]


def _resume(source: str, target: str, single, runs):
    if source not in runs:
        pytest.skip(f"layout {source} did not run in this session")
    nproc, args = LAYOUTS[target]
    out = runs["root"] / f"{source}-to-{target}"
    ckpt = runs[source] / "ckpt"
    result = run_workers(
        nproc, [*args, "--steps", str(STEPS), "--first-step", str(SAVE_AT), "--resume", str(ckpt)], out
    )
    worst = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], single["losses"][SAVE_AT:], strict=True))
    print(f"{source} -> {target}: steps {SAVE_AT}..{STEPS - 1} max loss rel {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.slow
def test_resume_tp_zero2_checkpoint_under_pipeline(single, runs):
    _resume("tp2xdp2-zero2", "pp2xdp2-zero1", single, runs)


@pytest.mark.slow
def test_resume_pipeline_checkpoint_under_zero3(single, runs):
    _resume("pp2xdp2-zero1", "dp2-zero3", single, runs)


@pytest.mark.slow
def test_resume_tp_checkpoint_under_sequence_parallel(single, runs):
    _resume("tp2xdp2-zero2", "tp2-sp-zero2", single, runs)


@pytest.mark.slow
def test_resume_sequence_parallel_checkpoint_without_it(single, runs):
    _resume("tp2-sp-zero2", "dp2-zero1", single, runs)


def test_sequence_parallel_refuses_seq_length_not_divisible_by_tp():
    from pretrain.parallel.layout import LayoutError, layout_from_config

    cfg = tiny_config(STEPS, tensor=2, sequence_parallel=True, overrides=["batch.seq_length=31"])
    with pytest.raises(LayoutError, match=r"batch.seq_length=31 is not divisible by parallel.tensor=2"):
        layout_from_config(cfg, 2, cfg.model_config())
    assert layout_from_config(tiny_config(STEPS, tensor=2, sequence_parallel=True), 2).sequence_parallel


@pytest.mark.slow
def test_zero3_checkpoint_resumes_in_single_process(single, runs):
    """The gathered files are the single-process format: LocalEngine continues the same trajectory."""
    from pretrain.engine import LocalEngine
    from pretrain.parallel.testing import micro_batches

    if "dp2-zero3" not in runs:
        pytest.skip("layout dp2-zero3 did not run in this session")
    cfg = tiny_config(STEPS)
    engine = LocalEngine(cfg, cfg.model_config())
    engine.load(runs["dp2-zero3"] / "ckpt")
    engine.iteration = SAVE_AT
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = [engine.train_step(micro_batches(step, cfg, 0, 1)).loss for step in range(SAVE_AT, STEPS)]
    finally:
        torch.set_num_threads(threads)
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, single["losses"][SAVE_AT:], strict=True))
    assert worst <= 1e-4

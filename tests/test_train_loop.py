"""The training loop end to end, in subprocesses: exact resume after kill -9, a save killed half-way,
SIGTERM, non-finite steps, and bad configs or data that fail before any work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain.testing import tiny_config, write_synthetic_mix

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory) -> Path:
    return write_synthetic_mix(tmp_path_factory.mktemp("data"))


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def start(config: Path, *overrides: str, driver: str | None = None) -> subprocess.Popen:
    head = ["-c", driver] if driver else ["-m", "pretrain.train"]
    command = [sys.executable, *head, "--config", str(config), *overrides]
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pretrain.train", "--config", str(config), *overrides]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)


def train_losses(output_dir: Path) -> dict[int, float]:
    """Step → loss from metrics.jsonl; a resumed run appends, so later lines win."""
    losses = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) first:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.005)


def latest(save_dir: Path) -> str | None:
    pointer = save_dir / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def test_kill_9_then_resume_gives_bit_identical_losses(tmp_path, mix_dir):
    n = 4
    sections = {"run": {"steps": 2 * n}, "checkpoint": {"every": n}, "logging": {"every": 1, "tensorboard": True},
                "eval": {"every": n, "batches": 2, "at_end": True}}
    straight = write_config(tmp_path / "a.yaml", tiny_config(mix_dir, tmp_path / "a", **sections))
    result = run(straight)
    assert result.returncode == 0, result.stderr
    reference = train_losses(tmp_path / "a")
    assert sorted(reference) == list(range(1, 2 * n + 1))
    assert reference[2 * n] < reference[1]  # it learns
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))

    killed = write_config(tmp_path / "b.yaml", tiny_config(mix_dir, tmp_path / "b", **sections))
    process = start(killed)
    # Kill once a step after the step-N checkpoint has run: the process is mid-run, past its last save.
    wait_for(lambda: len(train_losses(tmp_path / "b")) > n if (tmp_path / "b/metrics.jsonl").exists() else False,
             process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert latest(tmp_path / "b" / "checkpoints") == f"step_{n:08d}"
    resumed = run(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'b' / 'checkpoints' / f'step_{n:08d}'} at step {n}" in resumed.stdout
    after = train_losses(tmp_path / "b")
    for step in range(n + 1, 2 * n + 1):
        assert after[step] == reference[step], f"step {step}: {after[step]!r} != {reference[step]!r}"
    # The checkpoint written at the end is itself a model checkpoint (hgrn2's layout) with the trainer files.
    final = tmp_path / "b" / "checkpoints" / f"step_{2 * n:08d}"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 2 * n and state["consumed_samples"] == 2 * n * 8
    assert {"model.safetensors", "model_config.json", "optimizer.safetensors", "rng.safetensors",
            "config.yaml"} <= {p.name for p in final.iterdir()}
    from hgrn2.convert import to_hf

    report = to_hf(tmp_path / "b" / "checkpoints", tmp_path / "hf", verify=False)  # through `latest`
    assert report["tensors"] == 4 + 2 * 10 and (tmp_path / "hf" / "config.json").is_file()


KILL_IN_SAVE = """
import sys, time, pathlib
from pretrain import engine, train
original = engine.LocalEngine.save
def slow_save(self, directory):
    original(self, directory)
    if self.iteration >= 4:  # the second checkpoint: stop half-way, after the weights, before the rest
        pathlib.Path(directory).parent.joinpath("IN_SAVE").touch()
        time.sleep(600)
engine.LocalEngine.save = slow_save
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_save_killed_half_way_never_replaces_the_good_checkpoint(tmp_path, mix_dir):
    config = write_config(tmp_path / "c.yaml", tiny_config(mix_dir, tmp_path / "c", run={"steps": 6},
                                                           checkpoint={"every": 2}))
    save_dir = tmp_path / "c" / "checkpoints"
    process = start(config, driver=KILL_IN_SAVE)
    wait_for(lambda: (save_dir / "IN_SAVE").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest(save_dir) == "step_00000002"
    assert not (save_dir / "step_00000004").exists()
    assert (save_dir / ".tmp-step_00000004" / "model.safetensors").is_file()  # the half-written one
    import hgrn2

    hgrn2.load_checkpoint(save_dir / "step_00000002")  # the good one is intact
    resumed = run(config)
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 2," in resumed.stdout
    assert latest(save_dir) == "step_00000006"
    assert not list(save_dir.glob(".tmp-*"))


def test_sigterm_saves_and_exits(tmp_path, mix_dir):
    config = write_config(tmp_path / "d.yaml", tiny_config(mix_dir, tmp_path / "d", run={"steps": 200},
                                                           checkpoint={"every": 0}))
    process = start(config)
    wait_for(lambda: (tmp_path / "d" / "metrics.jsonl").exists() and len(train_losses(tmp_path / "d")) >= 2,
             process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "SIGTERM received" in out
    name = latest(tmp_path / "d" / "checkpoints")
    state = json.loads((tmp_path / "d" / "checkpoints" / name / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 200 and name == f"step_{state['step']:08d}"


def test_too_many_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, mix_dir):
    # lr 1e30: the first update is finite but huge, every later forward overflows to NaN.
    tree = tiny_config(mix_dir, tmp_path / "e", optimizer={"lr": 1e30, "grad_clip": 0.0},
                       schedule={"name": "constant", "warmup_steps": 0}, run={"steps": 20, "max_consecutive_skips": 3},
                       checkpoint={"every": 1})
    result = run(write_config(tmp_path / "e.yaml", tree))
    assert result.returncode == 3, result.stderr
    assert "4 non-finite steps in a row (run.max_consecutive_skips = 3); stopping" in result.stderr
    assert "step skipped (1 in a row)" in result.stderr
    save_dir = tmp_path / "e" / "checkpoints"
    assert latest(save_dir) == "step_00000001"
    assert [p.name for p in save_dir.glob("step_*")] == ["step_00000001"]
    records = [json.loads(line) for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if r["kind"] == "train"] == [False, True, True, True, True]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"mix_dir": "/nonexistent/mix"}}, "data.mix_dir: /nonexistent/mix is not a built mix"),
        ({"data": {"tokenizer": "/nonexistent/tok.model"}}, "data.tokenizer: /nonexistent/tok.model does not exist"),
        ({"run": {"steps": 100000}}, "run.steps × batch.global_batch_size = 800000 samples"),
        ({"batch": {"seq_length": 64}}, "batch.seq_length is 64 but the mix's samples hold 32"),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected a number, got 'fast'"),
    ],
)
def test_bad_config_or_data_fails_before_any_work(tmp_path, mix_dir, change, message):
    tree = tiny_config(mix_dir, tmp_path / "f")
    for section, values in change.items():
        tree[section].update(values)
    result = run(write_config(tmp_path / "f.yaml", tree))
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "f" / "checkpoints").exists() and not (tmp_path / "f" / "metrics.jsonl").exists()

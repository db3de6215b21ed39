"""``hgrn2-pretrain --config configs/NAME.yaml [key=value ...]``: train an HGRN2 model on a data mix.

The loop, in order: load and check everything that can be wrong (config, data, resume checkpoint)
before any work; build the engine (``pretrain.engine``); then per step take this rank's micro-batches
of the global batch at ``consumed_samples``, ``engine.train_step`` them, log, evaluate and checkpoint
every N steps. SIGTERM/SIGINT finish the current step, save a checkpoint and exit. Non-finite steps are
skipped; ``run.max_consecutive_skips`` in a row stop the run without saving over the last good one.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.config import ConfigError, TrainConfig, load_config
from pretrain.data import BatchSource, check_data, open_mix
from pretrain.engine import StepStats, TrainingEngine, build_engine
from pretrain.metrics import Reporter, flops_per_token, format_eta, memory_gib, peak_flops

EXIT_OK, EXIT_CONFIG, EXIT_DIVERGED = 0, 2, 3


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class TrainerState:
    """What the loop needs to continue exactly; saved in trainer_state.json."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    tokens_seen: int = 0
    config_hash: str = ""

    def to_dict(self, cfg: TrainConfig) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "tokens_seen": self.tokens_seen,
            "config_hash": self.config_hash,
            "global_batch_size": cfg.batch.global_batch_size,
            "schedule": {"name": cfg.schedule.name, "iteration": self.step, "total_steps": cfg.run.steps},
        }


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps."""

    signal_name: str | None = None
    previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            self.previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        if self.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal_name = signal.Signals(number).name

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def expected_dp_size(cfg: TrainConfig) -> int:
    """Data-parallel size: the processes (WORLD_SIZE) over the tensor × pipeline model-parallel group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline
    if world % model_parallel:
        raise ConfigError(f"WORLD_SIZE {world} is not a multiple of parallel.tensor × parallel.pipeline "
                          f"= {model_parallel}")
    return world // model_parallel


def check_tokenizer(cfg: TrainConfig) -> Path | None:
    if cfg.data.tokenizer is None:
        return None
    path = Path(cfg.data.tokenizer)
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: {path} does not exist")
    return path


class Trainer:
    """One training run: ``Trainer(cfg).run()``; the pieces are methods so that each stays short."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.data.spec is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("data.spec builds the mix; with several processes build it first and set data.mix_dir")
        self.data = open_mix(cfg)
        self.tokenizer = check_tokenizer(cfg)
        self.model_config = cfg.model_config(vocab_size=self.data.vocab_size)
        if self.model_config.vocab_size < self.data.vocab_size:
            raise ConfigError(f"model.vocab_size ({self.model_config.vocab_size}) is smaller than the mix's "
                              f"vocabulary ({self.data.vocab_size})")
        self.resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir)
        if cfg.run.torch_threads > 0:
            torch.set_num_threads(cfg.run.torch_threads)
        check_data(cfg, self.data, expected_dp_size(cfg))  # before the engine: no process group, no model yet
        seed_everything(cfg.run.seed)
        self.engine: TrainingEngine = build_engine(cfg, self.model_config)
        if self.engine.dp_size != expected_dp_size(cfg):
            raise ConfigError(f"the engine's data-parallel size {self.engine.dp_size} is not WORLD_SIZE / "
                              f"(tensor × pipeline) = {expected_dp_size(cfg)}")
        self.train_batches = BatchSource(cfg, self.data.train, self.engine.dp_rank, self.engine.dp_size)
        self.valid_batches = BatchSource(cfg, self.data.valid, self.engine.dp_rank, self.engine.dp_size)
        self.state = TrainerState(config_hash=cfg.hash())
        tensorboard = cfg.tensorboard_dir if cfg.logging.tensorboard else None
        self.report = Reporter(Path(cfg.run.output_dir), tensorboard, self.engine.is_main)
        self.flops_per_token, self.flops_formula = flops_per_token(self.model_config)
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.peak, self.peak_note = peak_flops(self.engine.device, cfg.logging.peak_tflops, self.world_size)
        self.last_saved_step = -1
        self.throughput: list[float] = []  # tokens/s of each logging window
        self.evaluations: list[dict] = []  # every evaluation of this run, with its step
        self.stop = StopFlag()

    # -- start ---------------------------------------------------------------------------------------

    def resume(self) -> None:
        if self.resume_from is None:
            return
        try:
            saved = checkpoint.load(self.engine, self.resume_from)
        except (ValueError, KeyError, FileNotFoundError) as error:
            raise ConfigError(f"cannot resume from {self.resume_from} (checkpoint.resume="
                              f"{self.cfg.checkpoint.resume}): {error}") from None
        for key in ("step", "consumed_samples", "skipped_steps", "consecutive_skips", "tokens_seen"):
            setattr(self.state, key, int(saved[key]))
        self.engine.iteration = self.state.step
        self.last_saved_step = self.state.step
        if saved.get("config_hash") != self.state.config_hash:
            self.report.print(f"note: the config differs from the checkpoint's (hash {saved.get('config_hash')} → "
                              f"{self.state.config_hash}); continuing with the new one")
        self.report.print(f"resumed from {self.resume_from} at step {self.state.step}, "
                          f"{self.state.consumed_samples} samples consumed")

    def describe(self) -> None:
        cfg, model = self.cfg, self.model_config
        from hgrn2.config import param_count

        accumulation = cfg.batch.global_batch_size // (cfg.batch.micro_batch_size * self.engine.dp_size)
        lines = [
            f"model: {cfg.model.preset} preset, {param_count(model) / 1e6:.2f}M parameters, d {model.hidden_size}, "
            f"{model.num_layers} layers, head dim {model.expand_ratio}, vocab {model.vocab_size}",
            f"data: {self.data.directory} ({len(self.data.train)} train / {len(self.data.valid)} valid samples "
            f"of {cfg.batch.seq_length} tokens)",
            f"batch: {cfg.batch.global_batch_size} samples/step = micro {cfg.batch.micro_batch_size} × accumulation "
            f"{accumulation} × data-parallel {self.engine.dp_size}; {cfg.run.steps} steps",
            f"device: {self.engine.device}, precision {cfg.run.precision}, {type(self.engine).__name__}",
            f"MFU: {self.flops_formula}; {self.peak_note}",
        ]
        for line in lines:
            self.report.print(line)
        self.report.text("config", "```\n" + cfg.to_yaml() + "\n```")
        self.report.text("mfu_formula", f"{self.flops_formula}; {self.peak_note}")
        if self.engine.is_main:
            Path(cfg.run.output_dir, "config.yaml").write_text(cfg.to_yaml())

    # -- steps ---------------------------------------------------------------------------------------

    def train_step(self) -> StepStats:
        batches = self.train_batches.global_batch(self.state.consumed_samples)
        stats = self.engine.train_step(batches)
        self.state.step += 1
        self.state.consumed_samples += self.cfg.batch.global_batch_size
        self.state.tokens_seen += stats.tokens
        self.report.record("train", self.state.step, {"loss": stats.loss, "grad_norm": stats.grad_norm,
                                                      "lr": stats.lr, "skipped": stats.skipped})
        if stats.skipped:
            self.state.skipped_steps += 1
            self.state.consecutive_skips += 1
            self.report.error(f"step {self.state.step}: non-finite loss {stats.loss} or grad norm {stats.grad_norm}; "
                              f"step skipped ({self.state.consecutive_skips} in a row)")
            if self.state.consecutive_skips > self.cfg.run.max_consecutive_skips:
                raise TrainingStopped(
                    f"{self.state.consecutive_skips} non-finite steps in a row (run.max_consecutive_skips = "
                    f"{self.cfg.run.max_consecutive_skips}); stopping. The last good checkpoint is kept: "
                    f"{checkpoint.read_latest(self.cfg.checkpoint_dir) or 'none was written'}"
                )
        else:
            self.state.consecutive_skips = 0
        return stats

    def evaluate(self) -> dict[str, float]:
        loss_sum, tokens = 0.0, 0
        for batch in self.valid_batches.eval_batches(self.cfg.eval.batches):
            batch_loss, batch_tokens = self.engine.eval_loss(batch)
            loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
        loss_sum, tokens = self.engine.reduce_sum([loss_sum, float(tokens)])
        loss = loss_sum / tokens
        result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
        self.evaluations.append({"step": self.state.step, **result})
        self.report.record("eval", self.state.step, result)
        self.report.scalars(self.state.step, {"eval/loss": loss, "eval/ppl": result["ppl"]})
        self.report.print(f"eval  step {self.state.step}: loss {loss:.4f}, ppl {result['ppl']:.2f} "
                          f"({int(tokens)} tokens)")
        return result

    def save(self) -> None:
        if self.state.step == self.last_saved_step:
            return
        if self.state.consecutive_skips:  # mid-streak of non-finite steps: the last good checkpoint stays latest
            self.report.print(f"not saving at step {self.state.step}: {self.state.consecutive_skips} non-finite "
                              f"step(s) in a row")
            return
        started = time.perf_counter()
        path = checkpoint.save(self.engine, self.cfg.checkpoint_dir, self.state.to_dict(self.cfg), self.cfg.to_yaml(),
                               self.tokenizer, self.cfg.checkpoint.keep)
        self.last_saved_step = self.state.step
        self.report.print(f"saved {path} ({time.perf_counter() - started:.1f} s)")

    def log(self, stats: StepStats, window: dict) -> None:
        """Console line and TensorBoard scalars for the steps since the last log."""
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        tokens_per_s = window["tokens"] / elapsed
        step_time = elapsed / max(window["steps"], 1)
        memory, _ = memory_gib(self.engine.device)
        values = {"train/loss": stats.loss, "train/lr": stats.lr, "train/grad_norm": stats.grad_norm,
                  "perf/tokens_per_s": tokens_per_s, "perf/memory_gib": memory,
                  "train/skipped_steps": self.state.skipped_steps}
        line = (f"step {self.state.step}/{self.cfg.run.steps} | loss {stats.loss:.4f} | lr {stats.lr:.3e} | "
                f"gnorm {stats.grad_norm:.3f} | {tokens_per_s / 1e3:.1f}k tok/s")
        if self.peak is not None:
            mfu = self.flops_per_token * tokens_per_s / self.peak
            values["perf/mfu"] = mfu
            line += f" | MFU {100 * mfu:.1f}%"
        eta = format_eta(step_time * (self.cfg.run.steps - self.state.step))
        line += f" | mem {memory:.2f} GiB | skipped {self.state.skipped_steps} | ETA {eta}"
        self.report.scalars(self.state.step, values)
        self.report.print(line)
        self.throughput.append(tokens_per_s)

    def summarize(self) -> None:
        """Steady-state throughput: the median over logging windows, the first (warm-up, compilation) left out."""
        windows = self.throughput[1:] or self.throughput
        if not windows:
            return
        tokens_per_s = float(np.median(windows))
        memory, memory_kind = memory_gib(self.engine.device)
        summary = {"tokens_per_s": tokens_per_s, "memory_gib": memory, "memory_kind": memory_kind,
                   "flops_per_token": self.flops_per_token, "windows": len(windows)}
        line = f"throughput: {tokens_per_s:,.0f} tokens/s (median of {len(windows)} windows)"
        if self.world_size > 1:
            summary["tokens_per_s_per_device"] = tokens_per_s / self.world_size
            line += f" = {tokens_per_s / self.world_size:,.0f} per device"
        if self.peak is not None:
            summary["mfu"] = self.flops_per_token * tokens_per_s / self.peak
            line += f", MFU {100 * summary['mfu']:.1f}%"
        self.report.record("summary", self.state.step, summary)
        self.report.print(f"{line}, {memory_kind} {memory:.2f} GiB")

    # -- the loop ------------------------------------------------------------------------------------

    def due(self, every: int) -> bool:
        return every > 0 and self.state.step % every == 0

    def run(self) -> dict:
        """Train to ``run.steps``; returns the final evaluation (empty if none)."""
        self.resume()
        self.report.open(self.state.step)
        self.describe()
        self.stop.install()
        final_eval: dict = {}
        try:
            if self.cfg.eval.at_start and self.state.step == 0:
                self.evaluate()
            window = {"start": time.perf_counter(), "tokens": 0, "steps": 0}
            while self.state.step < self.cfg.run.steps and self.stop.signal_name is None:
                stats = self.train_step()
                window["tokens"] += stats.tokens
                window["steps"] += 1
                if self.due(self.cfg.logging.every) or self.state.step == self.cfg.run.steps:
                    self.log(stats, window)
                    window = {"start": time.perf_counter(), "tokens": 0, "steps": 0}
                if self.due(self.cfg.eval.every) and self.state.step < self.cfg.run.steps:
                    final_eval = self.evaluate()
                if self.due(self.cfg.checkpoint.every):
                    self.save()
            self.summarize()
            if self.stop.signal_name is not None:
                self.report.print(f"{self.stop.signal_name} received: saving at step {self.state.step} and exiting")
            elif self.cfg.eval.at_end:
                final_eval = self.evaluate()
            if self.cfg.checkpoint.save_at_exit or self.stop.signal_name is not None:
                self.save()
        finally:
            self.stop.restore()
            self.report.close()
        return final_eval


def train(cfg: TrainConfig) -> dict:
    """Run training for ``cfg``; returns the final evaluation."""
    return Trainer(cfg).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hgrn2-pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, dotted keys, YAML values (e.g. optimizer.lr=1e-3 run.steps=100)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return EXIT_OK
        Trainer(cfg).run()
    except (ConfigError, FileNotFoundError) as error:
        print(f"hgrn2-pretrain: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except TrainingStopped as error:
        print(f"hgrn2-pretrain: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""The training configuration: one typed dataclass tree, loaded from YAML, overridable by ``key=value``.

    cfg = load_config("configs/150m.yaml", ["optimizer.lr=1e-3", "run.steps=500"])

Every section is a dataclass below; its field types are checked when loading (an ``int`` field rejects
``"abc"`` and ``1.5``, a ``float`` field accepts ``3`` and ``3e-4``), and unknown keys are errors that
name the dotted key. Override values are parsed as YAML scalars (``run.steps=10``, ``data.mix_dir=null``,
``optimizer.betas=[0.9,0.95]``). Nothing here is global: the loaded ``TrainConfig`` is passed down.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hgrn2.config import HGRN2Config, preset

SCHEDULES = ("cosine", "inverse_sqrt", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


@dataclass
class ModelSection:
    """A preset and the fields that override it; ``vocab_size: null`` takes the data's vocabulary."""

    preset: str = "tiny"
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    expand_ratio: int | None = None
    hidden_ratio: int | None = None
    intermediate_size: int | None = None
    use_lower_bound: bool | None = None
    tie_word_embeddings: bool | None = None
    initializer_range: float | None = None
    max_position_embeddings: int | None = None
    backend: str = "auto"
    chunk_size: int | None = None


@dataclass
class DataSection:
    """Where samples come from: a built mix directory, or a mix spec that is built (cached) first."""

    mix_dir: str | None = None
    spec: str | None = None
    tokenizer: str | None = None  # sentencepiece .model; copied into checkpoints as tokenizer.model
    # Reset the recurrent state at document boundaries (EOD tokens) inside a packed sample.
    reset_at_eod: bool = False


@dataclass
class OptimizerSection:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms, biases and the lower bounds Γ
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class ScheduleSection:
    """LR schedule over ``run.steps``: linear warmup, then ``name``; see ``pretrain.schedule``."""

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine and wsd end at lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays linearly


@dataclass
class BatchSection:
    micro_batch_size: int = 8
    global_batch_size: int = 8  # samples per optimizer step, over all data-parallel ranks
    seq_length: int = 2048  # must equal the mix's seq_length


@dataclass
class RunSection:
    steps: int = 1000
    seed: int = 1234
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    activation_checkpointing: bool = False
    output_dir: str = "runs/train"
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    torch_threads: int = 0  # 0 leaves torch's default
    # 0: cross-entropy over the materialised [tokens, vocab] logits; N > 0: the LM head and the loss fused,
    # N tokens at a time, never holding all the logits (hgrn2.fused; not with TP, PP or ZeRO-3)
    loss_chunk_tokens: int = 0


@dataclass
class CheckpointSection:
    dir: str | None = None  # default: {run.output_dir}/checkpoints
    every: int = 1000  # steps; 0 saves only at the end (and on SIGTERM)
    keep: int = 3  # complete checkpoints kept (older ones deleted)
    resume: str = "auto"  # auto: newest in dir if any; none: start fresh; or a checkpoint path
    save_at_exit: bool = True


@dataclass
class LoggingSection:
    every: int = 10  # steps between console lines and TensorBoard points
    tensorboard: bool = True
    tensorboard_dir: str | None = None  # default: {run.output_dir}/tensorboard
    peak_tflops: float | None = None  # MFU denominator; null: from the GPU's name (bf16 dense spec)


@dataclass
class EvalSection:
    every: int = 500  # steps; 0 disables periodic evaluation
    batches: int = 10  # micro-batches of the valid split per evaluation
    at_start: bool = False
    at_end: bool = True


@dataclass
class ParallelSection:
    """Parallel sizes, used by ``pretrain.parallel`` (issue 6); all 1 / 0 means one process."""

    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    # DeepSpeed ZeRO communication: reduce gradients while the backward runs (null: DeepSpeed's default, which
    # is off for stages 1-2 and on for 3), and the bucket size in elements for reduce and all-gather.
    zero_overlap_comm: bool | None = None
    zero_bucket_size: int = 500_000_000
    # ZeRO-1/2's gradient norm and overflow check as multi-tensor kernels (pretrain.parallel.zero_norms);
    # false keeps DeepSpeed's per-tensor loops
    zero_multi_tensor_checks: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    batch: BatchSection = field(default_factory=BatchSection)
    run: RunSection = field(default_factory=RunSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """A short digest of what fixes the training trajectory (not where files go or how often it logs)."""
        values = self.to_dict()
        for section in ("checkpoint", "logging", "eval"):
            values.pop(section)
        values["run"].pop("output_dir")
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.output_dir) / "checkpoints")

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.logging.tensorboard_dir or Path(self.run.output_dir) / "tensorboard")

    def model_config(self, vocab_size: int | None = None) -> HGRN2Config:
        """The HGRN2Config: preset, then the fields set here; ``vocab_size`` is the data's, if not set."""
        overrides = {
            f.name: getattr(self.model, f.name)
            for f in dataclasses.fields(ModelSection)
            if f.name != "preset" and getattr(self.model, f.name) is not None
        }
        if "vocab_size" not in overrides and vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        try:
            return preset(self.model.preset, **overrides)
        except ValueError as error:
            raise ConfigError(f"model: {error}") from None


# ---------------------------------------------------------------------------------------------------
# Loading and checking


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against ``annotation``; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; accept it as a number
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")  # a bug in this module


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix or "top level"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        keys = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ConfigError(f"unknown config key(s): {keys}; {where} accepts {', '.join(sorted(known))}")
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in values.items()
    }
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """``key=value`` strings (dotted keys, YAML values) applied to the raw config tree."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=1e-3)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {key}: value {text!r} is not valid YAML: {error}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks across fields; each error names the key."""

    def positive(key: str, value: int | float) -> None:
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value!r}")

    b = cfg.batch
    for name in ("micro_batch_size", "global_batch_size", "seq_length"):
        positive(f"batch.{name}", getattr(b, name))
    if b.global_batch_size % b.micro_batch_size:
        raise ConfigError(
            f"batch.global_batch_size ({b.global_batch_size}) must be a multiple of "
            f"batch.micro_batch_size ({b.micro_batch_size})"
        )
    positive("run.steps", cfg.run.steps)
    positive("optimizer.lr", cfg.optimizer.lr)
    if len(cfg.optimizer.betas) != 2 or not all(0 <= beta < 1 for beta in cfg.optimizer.betas):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {cfg.optimizer.betas}")
    for key, value in (("optimizer.weight_decay", cfg.optimizer.weight_decay), ("optimizer.grad_clip",
                       cfg.optimizer.grad_clip), ("schedule.warmup_steps", cfg.schedule.warmup_steps),
                       ("checkpoint.every", cfg.checkpoint.every), ("eval.every", cfg.eval.every),
                       ("run.max_consecutive_skips", cfg.run.max_consecutive_skips)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value!r}")
    positive("optimizer.eps", cfg.optimizer.eps)
    positive("checkpoint.keep", cfg.checkpoint.keep)
    positive("logging.every", cfg.logging.every)
    positive("eval.batches", cfg.eval.batches)
    if cfg.schedule.name not in SCHEDULES:
        raise ConfigError(f"schedule.name must be one of {', '.join(SCHEDULES)}, got {cfg.schedule.name!r}")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    if not 0 < cfg.schedule.decay_fraction <= 1:
        raise ConfigError(f"schedule.decay_fraction must be in (0, 1], got {cfg.schedule.decay_fraction}")
    if cfg.run.precision not in PRECISIONS:
        raise ConfigError(f"run.precision must be one of {', '.join(PRECISIONS)}, got {cfg.run.precision!r}")
    if cfg.run.device not in DEVICES:
        raise ConfigError(f"run.device must be one of {', '.join(DEVICES)}, got {cfg.run.device!r}")
    if (cfg.data.mix_dir is None) == (cfg.data.spec is None):
        raise ConfigError("data: set exactly one of data.mix_dir (a built mix) and data.spec (a mix spec YAML)")
    for name in ("tensor", "pipeline", "zero_bucket_size"):
        positive(f"parallel.{name}", getattr(cfg.parallel, name))
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.parallel.zero_stage}")
    check_fused_loss(cfg)
    cfg.model_config()  # the model fields must make a valid HGRN2Config
    return cfg


def check_fused_loss(cfg: TrainConfig) -> None:
    chunk, p = cfg.run.loss_chunk_tokens, cfg.parallel
    if chunk < 0:
        raise ConfigError(f"run.loss_chunk_tokens must be 0 (off) or positive, got {chunk}")
    if chunk and (p.tensor > 1 or p.pipeline > 1 or p.zero_stage == 3):
        raise ConfigError(
            "run.loss_chunk_tokens > 0 (the fused LM head and loss) reads the whole LM head weight on each rank: "
            f"it needs parallel.tensor=1, pipeline=1 and zero_stage <= 2 (got {p.tensor}, {p.pipeline}, "
            f"{p.zero_stage}); set run.loss_chunk_tokens=0"
        )


def config_from_dict(tree: dict, overrides: list[str] | None = None) -> TrainConfig:
    tree = apply_overrides(copy.deepcopy(tree), overrides or [])
    return validate(_build(TrainConfig, tree, ""))


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The validated config of YAML file ``path`` with ``overrides`` (``key=value``) applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    try:
        return config_from_dict(tree, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None

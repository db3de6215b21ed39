"""HGRN2 model configuration and the paper's presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

BACKENDS = ("auto", "naive", "chunk_torch", "triton")
ACTIVATIONS = ("swish",)


@dataclass
class HGRN2Config:
    """Everything that fixes the model's function and parameters (DESIGN.md §2).

    ``expand_ratio`` is the head dimension n: the state of each of the ``hidden_size // expand_ratio``
    heads is n × n. ``backend`` picks how the recurrence is computed and does not change the function.
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 24
    expand_ratio: int = 128
    hidden_ratio: int = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    use_lower_bound: bool = True
    norm_eps: float = 1e-6
    # fla fuses the token mixer's output norm with W_o and always uses this eps there.
    gate_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    backend: str = "auto"
    chunk_size: int = 16

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.expand_ratio

    @property
    def mlp_size(self) -> int:
        """The GLU width: fla's rule, ~(8/3)·d rounded up to a multiple of 256, unless set explicitly."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 256 * math.ceil(int(self.hidden_size * self.hidden_ratio * 2 / 3) / 256)

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "expand_ratio", "hidden_ratio", "chunk_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"HGRN2Config.{name} must be a positive integer, got {value!r}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"HGRN2Config.intermediate_size must be positive, got {self.intermediate_size!r}")
        if self.hidden_size % self.expand_ratio:
            raise ValueError(
                f"HGRN2Config.hidden_size ({self.hidden_size}) must be divisible by "
                f"HGRN2Config.expand_ratio ({self.expand_ratio}), the head dimension"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"HGRN2Config.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"HGRN2Config.backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("norm_eps", "gate_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HGRN2Config.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token = getattr(self, name)
            if token is not None and not 0 <= token < self.vocab_size:
                raise ValueError(f"HGRN2Config.{name} ({token}) is outside the vocabulary [0, {self.vocab_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> HGRN2Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HGRN2Config field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> HGRN2Config:
        return dataclasses.replace(self, **changes)


# Paper, appendix A, table 10 (expand ratio 128, sequence length 2048); vocabulary as fla's HGRN2.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=8192, hidden_size=128, num_layers=4, expand_ratio=32, max_position_embeddings=256),
    "150m": dict(hidden_size=768, num_layers=15),
    "385m": dict(hidden_size=1024, num_layers=26),
    "1b": dict(hidden_size=2048, num_layers=18),
    "3b": dict(hidden_size=2560, num_layers=36),
}


def preset(name: str, **overrides) -> HGRN2Config:
    """The configuration of a named preset (``tiny``, ``150m``, ``385m``, ``1b``, ``3b``)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown HGRN2 preset {name!r}; choose one of {', '.join(PRESETS)}")
    return HGRN2Config(**{**PRESETS[key], **overrides})


def param_count(config: HGRN2Config) -> int:
    """Exact number of parameters of ``HGRN2LM(config)`` (a tied LM head counts once)."""
    d, mlp = config.hidden_size, config.mlp_size
    token_mixer = 4 * d * d + d  # q, f, i, o projections and the output norm
    channel_mixer = 3 * d * mlp
    block = token_mixer + channel_mixer + 2 * d  # plus the two pre-norms
    embeddings = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    lower_bounds = config.num_layers * d if config.use_lower_bound else 0
    return embeddings + config.num_layers * block + d + lower_bounds

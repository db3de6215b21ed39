"""The training config: YAML + overrides into the typed tree, and errors that name the key."""

from pathlib import Path

import pytest

from pretrain.config import ConfigError, TrainConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parent.parent
BASE = {"data": {"mix_dir": "some/mix"}}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {mix_dir: m}\noptimizer: {lr: 1.0e-3}\nrun: {steps: 10}\n")
    cfg = load_config(path, ["optimizer.lr=2e-4", "run.steps=20", "optimizer.betas=[0.8,0.9]", "data.tokenizer=null",
                             "model.num_layers=3"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optimizer.lr == 2e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.run.steps == 20 and cfg.optimizer.betas == [0.8, 0.9]
    assert cfg.model_config(vocab_size=500).num_layers == 3
    assert cfg.model_config(vocab_size=500).vocab_size == 500  # vocab from the data unless set
    assert cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.grad_clip == 1.0  # paper defaults


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert config_from_dict(BASE, ["optimizer.lr=1"]).optimizer.lr == 1.0
    with pytest.raises(ConfigError, match=r"run\.steps: expected an integer, got 1\.5"):
        config_from_dict(BASE, ["run.steps=1.5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lrr=1", r"unknown config key\(s\): optimizer\.lrr"),
        ("optimiser.lr=1", r"unknown config key\(s\): optimiser"),
        ("batch.micro_batch_size=abc", r"batch\.micro_batch_size: expected an integer, got 'abc'"),
        ("run.activation_checkpointing=3", r"run\.activation_checkpointing: expected true or false"),
        ("schedule.name=linear", r"schedule\.name must be one of"),
        ("batch.global_batch_size=7", r"batch\.global_batch_size \(7\) must be a multiple"),
        ("optimizer.betas=[0.9]", r"optimizer\.betas must be two numbers"),
        ("parallel.zero_stage=4", r"parallel\.zero_stage"),
        ("run.loss_chunk_tokens=-1", r"run\.loss_chunk_tokens must be 0 \(off\) or positive"),
        ("parallel.zero_bucket_size=0", r"parallel\.zero_bucket_size must be positive"),
        ("model.preset=7b", r"model: unknown HGRN2 preset"),
        ("model.hidden_size=100", r"model: .*divisible"),
        ("data.spec=x.yaml", r"exactly one of data\.mix_dir"),
        ("run.steps", r"not of the form key=value"),
        ("optimizer.lr.x=1", r"optimizer\.lr: expected a number, got \{'x': 1\}"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(BASE, [override])


@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=3"])
def test_fused_loss_refused_where_the_lm_head_is_sharded(layout):
    with pytest.raises(ConfigError, match=r"run\.loss_chunk_tokens > 0 .* set run\.loss_chunk_tokens=0"):
        config_from_dict(BASE, ["run.loss_chunk_tokens=64", layout])


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data: {mix_dir: m}\nrun: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: unknown config key\(s\): run\.stepz"):
        load_config(wrong)


@pytest.mark.parametrize("name", ["150m", "385m", "1b", "3b"])
def test_paper_configs(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.model.preset == name
    assert cfg.batch.seq_length == 2048
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.grad_clip) == (3e-4, 0.1, 1.0)
    assert cfg.schedule.name == "cosine" and cfg.schedule.warmup_steps > 0
    model = cfg.model_config(vocab_size=32000)
    assert (model.hidden_size, model.num_layers) == {"150m": (768, 15), "385m": (1024, 26), "1b": (2048, 18),
                                                     "3b": (2560, 36)}[name]


def test_tiny_cpu_config_is_the_tiny_preset():
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml")
    model = cfg.model_config(vocab_size=8000)
    assert (model.hidden_size, model.num_layers, model.expand_ratio, model.vocab_size) == (128, 4, 32, 8000)


def test_hash_ignores_paths_and_logging_but_not_training():
    a = config_from_dict(BASE)
    assert a.hash() == config_from_dict(BASE, ["run.output_dir=elsewhere", "logging.every=3"]).hash()
    assert a.hash() != config_from_dict(BASE, ["optimizer.lr=1e-3"]).hash()

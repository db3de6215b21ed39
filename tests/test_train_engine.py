"""LocalEngine: gradient accumulation, weight-decay groups, non-finite skips, optimizer state round trip,
and packed batches with state resets."""

import numpy as np
import pytest
import torch

from pretrain.config import config_from_dict
from pretrain.data import make_batch
from pretrain.engine import Batch, LocalEngine, TrainingEngine, build_engine, parameter_groups

VOCAB = 97


def make_cfg(**run):
    tree = {"data": {"mix_dir": "unused"},
            "model": {"hidden_size": 64, "num_layers": 2, "expand_ratio": 16, "vocab_size": VOCAB},
            "optimizer": {"lr": 1e-2}, "run": {"steps": 10, "device": "cpu", **run}}
    return config_from_dict(tree)


def make_engine(cfg=None, seed=0) -> LocalEngine:
    cfg = cfg or make_cfg()
    torch.manual_seed(seed)
    return build_engine(cfg, cfg.model_config())


def random_batch(rows=4, length=24, seed=1) -> Batch:
    tokens = torch.randint(3, VOCAB, (rows, length + 1), generator=torch.Generator().manual_seed(seed))
    return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def split(batch: Batch, parts: int) -> list[Batch]:
    pairs = zip(batch.input_ids.chunk(parts), batch.labels.chunk(parts), strict=True)
    return [Batch(ids, labels) for ids, labels in pairs]


def test_build_engine_is_local_for_one_process():
    engine = make_engine()
    assert isinstance(engine, LocalEngine) and isinstance(engine, TrainingEngine)
    assert (engine.dp_rank, engine.dp_size, engine.is_main) == (0, 1, True)


def test_gradient_accumulation_matches_one_big_batch():
    whole, accumulated = make_engine(), make_engine()
    batch = random_batch()
    a = whole.train_step([batch])
    b = accumulated.train_step(split(batch, 4))
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert a.tokens == b.tokens == 4 * 24
    for p, q in zip(whole.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # Adam amplifies ~1e-7 grad noise


def test_no_weight_decay_on_norms_biases_and_lower_bounds():
    engine = make_engine()
    names = {p: n for n, p in engine.model.named_parameters()}
    decay, plain = parameter_groups(engine.model.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    plain_names = {names[p] for p in plain["params"]}
    assert "lower_bounds" in plain_names and "norm.weight" in plain_names
    assert all(n.endswith("norm.weight") or n == "lower_bounds" for n in plain_names)
    decayed = {names[p] for p in decay["params"]}
    assert {"embeddings.weight", "lm_head.weight", "layers.0.attn.q_proj.weight"} <= decayed
    assert len(plain_names) + len(decayed) == len(names)


def test_non_finite_step_is_skipped_and_changes_nothing():
    engine = make_engine()
    poisoned = 5
    with torch.no_grad():
        engine.model.embeddings.weight[poisoned] = float("inf")
    clean = random_batch()
    clean.input_ids[clean.input_ids == poisoned] = 6
    assert not engine.train_step([clean]).skipped  # the optimizer now has state, which must survive the skip
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    state_before = {k: v.clone() for k, v in engine.optimizer.state[engine.model.lm_head.weight].items()}
    bad = random_batch(seed=2)
    bad.input_ids[0, 3] = poisoned
    stats = engine.train_step([bad])
    assert stats.skipped and not np.isfinite(stats.loss)
    assert engine.iteration == 2  # the schedule still advances: the batch was consumed
    for name, parameter in engine.model.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.grad is None
    for key, value in engine.optimizer.state[engine.model.lm_head.weight].items():
        assert torch.equal(value, state_before[key])
    assert not engine.train_step([clean]).skipped


def test_save_load_round_trip_continues_bit_identically(tmp_path):
    engine = make_engine()
    batches = [random_batch(seed=s) for s in range(4)]
    for batch in batches[:2]:
        engine.train_step([batch])
    engine.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model_config.json", "model.safetensors", "optimizer.safetensors"}
    restored = make_engine(seed=123)  # different initial weights: everything must come from the files
    restored.load(tmp_path)
    restored.iteration = engine.iteration
    for batch in batches[2:]:
        assert engine.train_step([batch]).loss == restored.train_step([batch]).loss


def test_load_rejects_a_mismatched_optimizer_file(tmp_path):
    engine = make_engine()
    engine.train_step([random_batch()])
    engine.save(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "optimizer.safetensors"))
    tensors.pop("exp_avg.norm.weight")
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    with pytest.raises(ValueError, match="missing 'exp_avg.norm.weight'"):
        make_engine().load(tmp_path)


def test_packed_batch_resets_after_each_eod():
    eod = 2
    samples = np.array([[5, 6, eod, 7, 8, 9, eod, 4, 3], [eod, 5, 5, 5, 5, 5, 5, 5, 5]])
    batch = make_batch(samples, eod)
    assert batch.input_ids.shape == (1, 16) and batch.labels.shape == (1, 16)
    assert batch.cu_seqlens.tolist() == [0, 3, 7, 8, 9, 16]
    assert batch.input_ids[0, :8].tolist() == samples[0, :-1].tolist()
    assert batch.labels[0, 8:].tolist() == samples[1, 1:].tolist()
    plain = make_batch(samples, None)
    assert plain.cu_seqlens is None and plain.input_ids.shape == (2, 8)


def test_packed_training_step_uses_the_resets():
    cfg = make_cfg()
    engine = make_engine(cfg)
    tokens = torch.randint(3, VOCAB, (2, 33), generator=torch.Generator().manual_seed(3)).numpy()
    tokens[0, 10] = tokens[1, 20] = 2
    packed, plain = make_batch(tokens, 2), make_batch(tokens, None)
    assert engine.eval_loss(packed)[1] == engine.eval_loss(plain)[1] == 64
    assert engine.eval_loss(packed)[0] != pytest.approx(engine.eval_loss(plain)[0], rel=1e-7)
    assert not engine.train_step([packed]).skipped


def test_activation_checkpointing_computes_the_same_step():
    plain, checkpointed = make_engine(), make_engine(make_cfg(activation_checkpointing=True))
    assert checkpointed.model.activation_checkpointing and not plain.model.activation_checkpointing
    batch = random_batch()
    a, b = plain.train_step([batch]), checkpointed.train_step([batch])
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)


def test_fused_loss_trains_like_the_materialised_one():
    plain, fused = make_engine(), make_engine(make_cfg(loss_chunk_tokens=40))  # 96 tokens: a partial chunk
    for seed in (1, 2, 3):
        batch = random_batch(seed=seed)
        a, b = plain.train_step([batch]), fused.train_step([batch])
        assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert plain.eval_loss(batch)[0] == pytest.approx(fused.eval_loss(batch)[0], rel=1e-6)

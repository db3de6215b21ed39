"""LR schedules: warmup, cosine, inverse-sqrt and warmup-stable-decay, as pure functions of the step."""

import math

import pytest

from pretrain.config import ScheduleSection
from pretrain.schedule import lr_at

LR = 3e-4


def schedule(name, **kw):
    return ScheduleSection(name=name, **kw)


@pytest.mark.parametrize("name", ["cosine", "inverse_sqrt", "wsd", "constant"])
def test_linear_warmup(name):
    s = schedule(name, warmup_steps=10)
    assert [lr_at(k, LR, 100, s) for k in (0, 4, 9)] == pytest.approx([LR / 10, LR / 2, LR])
    assert lr_at(10, LR, 100, s) <= LR


def test_cosine_decays_to_min_at_the_last_step():
    s = schedule("cosine", warmup_steps=10, min_lr_ratio=0.1)
    values = [lr_at(k, LR, 100, s) for k in range(100)]
    assert values[10] == pytest.approx(LR)
    assert values[-1] == pytest.approx(0.1 * LR)
    assert lr_at(55, LR, 100, s) == pytest.approx(0.1 * LR + 0.9 * LR * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_inverse_sqrt():
    s = schedule("inverse_sqrt", warmup_steps=16)
    assert lr_at(15, LR, 1000, s) == pytest.approx(LR)
    assert lr_at(63, LR, 1000, s) == pytest.approx(LR / 2)  # sqrt(16 / 64)


def test_warmup_stable_decay():
    s = schedule("wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(50, LR, 100, s) == LR and lr_at(79, LR, 100, s) == LR
    assert lr_at(89, LR, 100, s) == pytest.approx(LR / 2)
    assert lr_at(99, LR, 100, s) == pytest.approx(0.0)

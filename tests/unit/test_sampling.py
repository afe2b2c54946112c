"""Samplers do what their names promise, on logits whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ModelError
from runtime.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.unit

LOGITS = np.log(np.array([0.50, 0.25, 0.15, 0.06, 0.04]))  # probabilities, best first


def draws(params: SamplingParams, n: int = 4000, history=()) -> np.ndarray:
    sampler = Sampler(params)
    return np.bincount([sampler(LOGITS, history) for _ in range(n)], minlength=5) / n


def test_greedy_is_argmax():
    assert Sampler(SamplingParams.greedy())(LOGITS) == 0


def test_temperature_one_follows_the_distribution():
    freq = draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)


def test_top_k_keeps_the_k_best():
    freq = draws(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))
    assert freq[2:].sum() == 0
    np.testing.assert_allclose(freq[:2], [2 / 3, 1 / 3], atol=0.03)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    freq = draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=0))
    assert freq[3:].sum() == 0 and freq[2] > 0  # 0.50 + 0.25 < 0.8 ≤ 0.50 + 0.25 + 0.15


def test_min_p_drops_tokens_below_a_share_of_the_best():
    freq = draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25, seed=0))
    assert freq[3:].sum() == 0 and freq[2] > 0  # 0.15 ≥ 0.25·0.50 > 0.06


def test_repetition_penalty_discourages_seen_tokens():
    params = SamplingParams.greedy(repetition_penalty=10.0)
    logits = np.array([2.0, 1.5, -1.0])
    assert Sampler(params)(logits, history=[0]) == 1
    assert Sampler(params)(np.array([-1.0, -1.5, -5.0]), history=[0]) == 1  # negative: ×10


def test_same_seed_same_draws_other_seed_differs():
    def sequence(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.5, seed=seed))
        return [sampler(LOGITS) for _ in range(50)]

    assert sequence(7) == sequence(7)
    assert len(set(sequence(7))) > 1 and sequence(8) != sequence(7)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                                         ("min_p", 1.0), ("max_tokens", 0), ("top_k", -1),
                                         ("repetition_penalty", 0.0)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ModelError, match=f"{field} = {value!r} is not valid"):
        SamplingParams(**{field: value})

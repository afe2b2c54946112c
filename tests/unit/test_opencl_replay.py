"""The per-step arguments a recorded decode step re-sets: their arithmetic, and that numpy
cannot freeze one by accident (a launcher that forgot it would record one position forever)."""

import numpy as np
import pytest

from runtime.backends.opencl_replay import PerStep, i32, now, position

pytestmark = pytest.mark.unit


def test_a_kv_offset_follows_the_position():
    kv_off = position(5) * 2 * 64 + 3  # pos · (kv heads · head dim) + a part's first row
    assert kv_off == PerStep(128, 3, 5)
    assert now(kv_off) == 5 * 128 + 3 and kv_off.at(9) == np.int32(9 * 128 + 3)
    assert (7 + position(2)).at(4) == 11


def test_launch_arguments_pass_through_or_become_int32():
    pos = position(3)
    assert i32(pos) is pos and now(4) == 4
    assert type(i32(12)) is np.int32 and i32(12) == 12


def test_numpy_refuses_to_freeze_a_per_step_argument():
    with pytest.raises(TypeError):
        np.int32(position(3))

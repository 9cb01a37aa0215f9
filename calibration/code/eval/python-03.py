"""Pytest tests for a tiny temperature-conversion module.

The functions under test are defined at the top so the file is
self-contained; in the real project they live in units/temperature.py.
"""
import math

import pytest

ABSOLUTE_ZERO_C = -273.15


def c_to_f(c: float) -> float:
    return c * 9 / 5 + 32


def f_to_c(f: float) -> float:
    return (f - 32) * 5 / 9


def c_to_k(c: float) -> float:
    if c < ABSOLUTE_ZERO_C:
        raise ValueError("below absolute zero")
    return c - ABSOLUTE_ZERO_C


@pytest.mark.parametrize(
    "celsius, fahrenheit",
    [(0, 32), (100, 212), (-40, -40), (37, 98.6)],
)
def test_c_to_f_known_points(celsius, fahrenheit):
    assert c_to_f(celsius) == pytest.approx(fahrenheit)


@pytest.mark.parametrize("value", [-100.0, -1.5, 0.0, 21.3, 1000.0])
def test_round_trip(value):
    assert f_to_c(c_to_f(value)) == pytest.approx(value)


def test_kelvin_of_freezing_point():
    assert c_to_k(0) == pytest.approx(273.15)


def test_kelvin_rejects_impossible_temperature():
    with pytest.raises(ValueError, match="absolute zero"):
        c_to_k(-300)


def test_conversion_is_monotonic():
    temps = [x / 2 for x in range(-200, 200)]
    converted = [c_to_f(t) for t in temps]
    assert converted == sorted(converted)


def test_nan_propagates():
    assert math.isnan(c_to_f(float("nan")))

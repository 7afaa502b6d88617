import pytest

from sparsebert.modifiers.schedules import interpolate, learning_rate


def test_cubic_and_linear_values():
    # cubic: s_f + (s_i - s_f)(1 - p)^3 (Zhu & Gupta 2017)
    assert interpolate(0.0, 0, 10, 0.05, 0.85, "cubic") == pytest.approx(0.05)
    assert interpolate(5.0, 0, 10, 0.05, 0.85, "cubic") == pytest.approx(0.85 + (0.05 - 0.85) * 0.5**3)
    assert interpolate(2.0, 0, 10, 0.0, 0.9, "cubic") == pytest.approx(0.9 * (1 - 0.8**3))
    assert interpolate(12.0, 0, 10, 0.0, 0.9, "cubic") == pytest.approx(0.9)
    assert interpolate(-1.0, 0, 10, 0.1, 0.9, "cubic") == pytest.approx(0.1)
    assert interpolate(2.5, 0, 10, 0.0, 0.8, "linear") == pytest.approx(0.2)
    assert interpolate(7.0, 2, 12, 0.0, 0.8, "linear") == pytest.approx(0.4)
    with pytest.raises(ValueError):
        interpolate(1, 0, 2, 0, 1, "quadratic")


def test_lr_functions():
    assert learning_rate(1.0, "linear", 0, 4, 1e-4, 0.0) == pytest.approx(7.5e-5)
    # cyclic_linear restarts every cycle_epochs
    assert learning_rate(2.0, "cyclic_linear", 2, 28, 1e-4, 5e-5, 2.0) == pytest.approx(1e-4)
    assert learning_rate(3.0, "cyclic_linear", 2, 28, 1e-4, 5e-5, 2.0) == pytest.approx(7.5e-5)
    assert learning_rate(4.5, "cyclic_linear", 2, 28, 1e-4, 5e-5, 2.0) == pytest.approx(8.75e-5)
    with pytest.raises(ValueError):
        learning_rate(1, "cyclic_linear", 0, 2, 1, 0)

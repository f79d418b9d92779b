import numpy as np
import pytest

from ebmscale.eval.classifier import accuracy, calibration_bins, expected_calibration_error, reliability_diagram


def test_ece_hand_computed():
    # Two bins used (n_bins=10): confidences 0.95 (bin 9) and 0.55 (bin 5).
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.05, 0.95], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0, 0])
    # bin 9: conf 0.95, acc 2/3; bin 5: conf 0.55, acc 1/2 -> ECE = 3/5*|2/3-0.95| + 2/5*|0.5-0.55|
    expected = 3 / 5 * abs(2 / 3 - 0.95) + 2 / 5 * 0.05
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(expected)
    assert accuracy(probs, labels) == pytest.approx(3 / 5)
    b = calibration_bins(probs, labels, n_bins=10)
    assert b["count"].sum() == 5 and b["count"][9] == 3 and b["count"][5] == 2


def test_perfectly_calibrated_is_near_zero_and_png(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200000)
    correct = rng.random(200000) < conf
    labels = np.where(correct, 0, 1)
    probs = np.stack([conf, 1 - conf], 1)
    assert expected_calibration_error(probs, labels) < 0.01
    reliability_diagram(probs, labels, str(tmp_path / "rel.png"))
    assert (tmp_path / "rel.png").stat().st_size > 1000

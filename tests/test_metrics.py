import numpy as np
import pytest

from ppap_fast.metrics import frechet_distance, inception_score, precision_recall


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 16))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_shift_is_the_squared_mean_difference():
    x = np.random.default_rng(1).normal(size=(400, 8))
    d = np.arange(8) * 0.1
    assert frechet_distance(x, x + d) == pytest.approx(float((d ** 2).sum()), rel=1e-6, abs=1e-8)
    # and matches the textbook formula with scipy's sqrtm
    scipy_linalg = pytest.importorskip("scipy.linalg")
    y = np.random.default_rng(2).normal(size=(400, 8)) * 1.5 + 0.3
    m1, m2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_precision_recall_identical_and_disjoint_sets():
    x = np.random.default_rng(0).normal(size=(100, 5))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    p, r = precision_recall(x, x + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    # a fake set collapsed onto a few real points: high precision, low recall
    p, r = precision_recall(x, np.repeat(x[:5], 20, axis=0), k=3)
    assert p == 1.0 and r < 0.3


def test_inception_score_bounds():
    k = 10
    onehot = np.eye(k)[np.arange(200) % k]
    assert inception_score(onehot) == pytest.approx(k, rel=1e-6)
    assert inception_score(np.tile(np.eye(k)[:1], (50, 1))) == pytest.approx(1.0, rel=1e-6)
    assert inception_score(np.full((50, k), 1 / k)) == pytest.approx(1.0, rel=1e-6)


def test_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)

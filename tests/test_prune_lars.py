"""slim's Gram-form LASSO path (slim.prune.lars) against scikit-learn's lars_path_gram, breakpoint by breakpoint."""

import warnings

import numpy as np
import pytest

from slim.errors import PruneError
from slim.prune.lars import lasso_path

pytest.importorskip("scipy")


def _problem(seed):
    """A random regression with c predictors; every third one has strongly correlated columns, so that coefficients
    cross zero and channels leave the active set (the LASSO modification of LARS)."""
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 40))
    N = int(rng.integers(c + 1, 3 * c + 5))
    X = rng.normal(size=(N, c))
    if seed % 3 == 0:
        X[:, :c // 2] += 0.9 * X[:, c // 2:c // 2 * 2]
    y = X @ (rng.normal(size=c) * (rng.random(c) < 0.5)) + 0.5 * rng.normal(size=N)
    return X.T @ X, X.T @ y, N


def _sklearn(G, q, N):
    sklearn_lars = pytest.importorskip("sklearn.linear_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alphas, _, coefs = sklearn_lars.lars_path_gram(Xy=q, Gram=G, n_samples=N, method="lasso",
                                                       max_iter=10 * len(q) + 10)
    return alphas, coefs


def test_the_path_equals_scikit_learns():
    with_drops = 0
    for seed in range(120):
        G, q, N = _problem(seed)
        expected_alphas, expected = _sklearn(G, q, N)
        alphas, coefs = lasso_path(G, q, N)
        assert alphas.shape == expected_alphas.shape, seed
        np.testing.assert_allclose(alphas, expected_alphas, rtol=1e-7, atol=1e-10, err_msg=f"seed {seed}")
        np.testing.assert_allclose(coefs, expected, rtol=1e-6, atol=1e-8, err_msg=f"seed {seed}")
        on = coefs != 0
        with_drops += bool((on[:, :-1] & ~on[:, 1:]).any())    # a channel left the active set
    assert with_drops >= 30                                   # the drop branch was exercised, not only joins


def test_a_path_stopped_at_a_count_is_the_whole_paths_beginning():
    for seed in range(60):
        G, q, N = _problem(seed)
        full_alphas, full = lasso_path(G, q, N)
        keep = max(1, len(q) // 2)
        alphas, coefs = lasso_path(G, q, N, until=keep)
        m = len(alphas)
        np.testing.assert_array_equal(alphas, full_alphas[:m])
        np.testing.assert_array_equal(coefs, full[:, :m])
        counts = (full != 0).sum(0)
        assert (coefs[:, -1] != 0).sum() == keep
        assert m - 1 == int(np.nonzero(counts == keep)[0][0])   # the first breakpoint with that count


def test_a_duplicated_or_dead_channel_never_joins():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6))
    X = np.hstack([X, X[:, [2]], np.zeros((50, 1))])        # channel 6 repeats channel 2, channel 7 is dead
    y = X[:, :6] @ rng.normal(size=6) + 0.1 * rng.normal(size=50)
    alphas, coefs = lasso_path(X.T @ X, X.T @ y, 50)
    assert not ((coefs[2] != 0) & (coefs[6] != 0)).any()
    assert not (coefs[7] != 0).any()
    assert (coefs[:, -1] != 0).sum() == 6 and alphas[-1] == pytest.approx(0, abs=1e-12)
    # The fit at the end of the path is the least squares over the six independent channels.
    kept = np.nonzero(coefs[:, -1])[0]
    ls = np.linalg.lstsq(X[:, kept], y, rcond=None)[0]
    np.testing.assert_allclose(coefs[kept, -1], ls, rtol=1e-8)


def test_trivial_problems():
    alphas, coefs = lasso_path(np.zeros((3, 3)), np.zeros(3), 10)
    assert alphas.tolist() == [0.0] and not coefs.any()
    alphas, coefs = lasso_path(np.eye(3), np.array([3.0, -2.0, 1.0]), 1, until=0)
    assert len(alphas) == 1 and not coefs.any()
    alphas, coefs = lasso_path(np.eye(3), np.array([3.0, -2.0, 1.0]), 1)
    np.testing.assert_allclose(alphas, [3, 2, 1, 0])
    np.testing.assert_allclose(coefs[:, -1], [3, -2, 1])


def test_without_scipy_the_error_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "scipy.linalg.blas", None)
    with pytest.raises(PruneError, match=r"pip install 'slim\[lasso\]'"):
        lasso_path(np.eye(2), np.ones(2), 1)

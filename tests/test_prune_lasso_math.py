"""LASSO selection and least squares on streamed statistics (slim.prune.lasso) against row-form computations."""

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.linear_model import lars_path  # noqa: E402

from slim.prune.lasso import channel_gram, expand, least_squares, relative_error, select_channels  # noqa: E402


def _problem(seed, N=300, c=8, kk=3, n=5, bias=True):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, c * kk)) + rng.normal(size=c * kk)        # non-zero means: the centring matters
    W = rng.normal(size=(n, c * kk)) * rng.uniform(0.1, 2.0, size=c).repeat(kk)
    b = rng.normal(size=n) if bias else np.zeros(n)
    Y = X @ W.T + b + 0.1 * rng.normal(size=(N, n))
    Xt = np.hstack([X, np.ones((N, 1))])
    return X, Y, W, np.repeat(np.arange(c), kk), Xt.T @ Xt, Xt.T @ Y, float((Y * Y).sum())


def _row_form(X, Y, W, columns, center):
    """The paper's design matrix Z (N*n x c) and target y, built sample by sample."""
    c = columns.max() + 1
    if center:
        X = X - X.mean(0)
        Y = Y - Y.mean(0)
    Z = np.stack([(X[:, columns == i] @ W[:, columns == i].T).reshape(-1) for i in range(c)], 1)
    return Z, Y.reshape(-1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("center", [False, True])
def test_gram_equals_row_form(seed, center):
    X, Y, W, columns, A, B, _ = _problem(seed)
    channels, G, q = channel_gram(A, B, W, columns, len(X), center)
    Z, y = _row_form(X, Y, W, columns, center)
    np.testing.assert_allclose(G, Z.T @ Z, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(q, Z.T @ y, rtol=1e-9, atol=1e-6)
    assert list(channels) == list(range(8))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("keep", [1, 3, 5, 7])
def test_gram_selection_equals_row_form_lasso(seed, keep):
    X, Y, W, columns, A, B, _ = _problem(seed)
    _, G, q = channel_gram(A, B, W, columns, len(X), True)
    sel = select_channels(G, q, Y.size, keep)
    # Row form: scikit-learn's LARS-lasso on the explicit design, first breakpoint with `keep` active channels.
    Z, y = _row_form(X, Y, W, columns, True)
    _, _, coefs = lars_path(Z, y, method="lasso")
    counts = (coefs != 0).sum(0)
    expected = np.nonzero(coefs[:, int(np.nonzero(counts == keep)[0][0])])[0]
    assert len(sel.kept) == keep
    assert sel.kept.tolist() == expected.tolist()


def test_selection_prefers_the_channels_that_carry_the_target():
    rng = np.random.default_rng(0)
    N, c, n = 500, 6, 4
    X = rng.normal(size=(N, c))
    W = rng.normal(size=(n, c))
    W[:, [1, 4]] *= 0.01                                    # two nearly silent channels
    Y = X @ W.T
    Xt = np.hstack([X, np.ones((N, 1))])
    _, G, q = channel_gram(Xt.T @ Xt, Xt.T @ Y, W, np.arange(c), N, True)
    assert sorted(select_channels(G, q, Y.size, 4).kept.tolist()) == [0, 2, 3, 5]


def test_rank_tol_keeps_a_count_within_the_window():
    X, Y, W, columns, A, B, _ = _problem(3, c=20, kk=1)
    _, G, q = channel_gram(A, B, W, columns, len(X), True)
    sel = select_channels(G, q, Y.size, 10, rank_tol=0.1)
    assert 10 <= len(sel.kept) <= 11 and sel.active == len(sel.kept)


def test_least_squares_at_full_width_reproduces_the_layer():
    X, Y, W, columns, A, B, yy = _problem(1)
    N = len(X)
    Y = X @ W.T + 0.5                                        # exactly linear, with a bias
    Xt = np.hstack([X, np.ones((N, 1))])
    A, B, yy = Xt.T @ Xt, Xt.T @ Y, float((Y * Y).sum())
    sol = least_squares(A, B, np.arange(X.shape[1]), True, ridge=0.0)
    np.testing.assert_allclose(sol[:-1], W.T, atol=1e-8)
    np.testing.assert_allclose(sol[-1], 0.5, atol=1e-8)
    assert relative_error(A, B, yy, expand(sol, np.arange(X.shape[1]), X.shape[1], True)) < 1e-8


def test_least_squares_matches_lstsq_on_the_kept_columns():
    X, Y, W, columns, A, B, yy = _problem(2)
    kept = np.nonzero(np.isin(columns, [0, 2, 5]))[0]
    sol = least_squares(A, B, kept, True, ridge=0.0)
    Xk = np.hstack([X[:, kept], np.ones((len(X), 1))])
    ref = np.linalg.lstsq(Xk, Y, rcond=None)[0]
    np.testing.assert_allclose(sol, ref, rtol=1e-7, atol=1e-8)
    full = expand(sol, kept, X.shape[1], True)
    direct = np.linalg.norm(Y - Xk @ ref) / np.linalg.norm(Y)
    assert relative_error(A, B, yy, full) == pytest.approx(direct, rel=1e-6)


def test_ridge_solves_a_rank_deficient_input():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(200, 4))
    X = np.hstack([X, X[:, :1], np.zeros((200, 1))])          # a duplicated and a dead column
    Y = X[:, :4] @ rng.normal(size=(4, 3))
    Xt = np.hstack([X, np.ones((200, 1))])
    sol = least_squares(Xt.T @ Xt, Xt.T @ Y, np.arange(6), True, ridge=1e-6)
    assert np.isfinite(sol).all()
    np.testing.assert_allclose(Xt @ np.vstack([sol[:-1], sol[-1:]]), Y, atol=1e-4)

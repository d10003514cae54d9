"""Benchmark: slim's Gram-form LASSO path (slim.prune.lars) against scikit-learn's lars_path_gram, the solver slim
used before, on the selection --criterion lasso makes: c channels, keep c/2.

For each size a random regression (c + 200 rows, so that channels leave the active set on the way) is turned into its
Gram form, scaled to unit diagonal as slim.prune.lasso does, and solved by
  slim      lasso_path(G, q, n, until=c/2): the path up to the first breakpoint with c/2 active channels;
  sklearn   lars_path_gram(..., method="lasso") to the end of the path, as slim called it before;
  sklearn@k the same, cut at max_iter = c/2 steps (its best case: fewer than c/2 active when channels left on the way).
The runs alternate (slim, sklearn, sklearn@k, slim, ...); medians are reported with the ratio, and each repeat checks
that both pick the same channels (scikit-learn's first breakpoint with c/2 coefficients above 1e-12).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_lars.py --sizes 1024 2048 4096 --repeats 3
"""

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slim.prune.lars import lasso_path  # noqa: E402


def problem(c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(c + 200, c))
    y = X @ rng.normal(size=c) * 0.1 + rng.normal(size=c + 200)
    G, q = X.T @ X, X.T @ y
    scale = float(np.diag(G).max())
    return G / scale, q / scale, 3 * c


def run_slim(G, q, n, keep):
    _, coefs = lasso_path(G, q, n, until=keep)
    return np.flatnonzero(coefs[:, -1])


def run_sklearn(G, q, n, keep, max_iter):
    from sklearn.linear_model import lars_path_gram
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, coefs = lars_path_gram(Xy=q, Gram=G, n_samples=n, method="lasso", max_iter=max_iter)
    on = np.abs(coefs) > 1e-12
    hits = np.flatnonzero(on.sum(0) == keep)
    return np.flatnonzero(on[:, hits[0]]) if len(hits) else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import sklearn
    print(f"# {platform.machine()}, {platform.python_version()}, numpy {np.__version__}, scikit-learn "
          f"{sklearn.__version__}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    print("| channels -> kept | slim | scikit-learn, whole path | ratio | scikit-learn cut at c/2 steps | ratio | "
          "same channels |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for c in args.sizes:
        G, q, n = problem(c)
        keep = c // 2
        times = {"slim": [], "full": [], "cut": []}
        same, cut_short = True, False
        for _ in range(args.repeats):
            for name, fn in (("slim", lambda: run_slim(G, q, n, keep)),
                             ("full", lambda: run_sklearn(G, q, n, keep, 10 * c + 10)),
                             ("cut", lambda: run_sklearn(G, q, n, keep, keep))):
                start = time.perf_counter()
                chosen = fn()
                times[name].append(time.perf_counter() - start)
                if name == "slim":
                    mine = chosen
                elif chosen is not None:
                    same &= bool(np.array_equal(chosen, mine))
                elif name == "full":
                    same = False
                else:
                    cut_short = True                  # channels left on the way: c/2 steps end below c/2 active
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {c:,} -> {keep:,} | {med['slim']:.2f} s | {med['full']:.2f} s | {med['full'] / med['slim']:.1f}x | "
              f"{med['cut']:.2f} s{' (ends below c/2)' if cut_short else ''} | {med['cut'] / med['slim']:.1f}x | "
              f"{'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()

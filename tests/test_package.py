"""``import slim``: the names the README documents, lazily imported, listed by dir(), and torch-free until used."""

import subprocess
import sys
from pathlib import Path

import slim

PACKAGE = Path(slim.__file__).resolve().parent


def test_every_submodule_is_reachable_as_an_attribute_and_listed():
    # The first hour of a real user: `import slim; slim.solver` raised AttributeError although the README names it.
    on_disk = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert set(slim._SUBMODULES) == on_disk - {"commands"}      # the command line's own modules stay internal
    names = dir(slim)
    for name in ("solver", "prune", "flops", "io", "Net", "read_net", "__version__"):
        assert name in names, name


def test_documented_names_resolve_in_a_fresh_interpreter_without_loading_torch_first():
    code = ("import sys, slim; assert 'torch' not in sys.modules; slim.graph.build_graph; slim.io.read_net; "
            "assert 'torch' not in sys.modules; "
            "slim.solver.Solver; slim.prune.prune_net; slim.flops.calflop; slim.Net; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_unknown_attribute_is_still_an_attribute_error():
    import pytest
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slim.nope

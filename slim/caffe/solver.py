"""pycaffe's solvers over slim's Solver: ``SGDSolver(file)``, ..., ``get_solver(file)``.

    solver = caffe.SGDSolver("solver.prototxt")
    solver.net.forward()                    # pycaffe views of the train net and the test nets
    solver.step(1)                          # slim's training loop: Caffe's update rules, lr policies, snapshots,
    solver.net.blobs["loss"].data           #   and slim's network-slimming penalty when the solver sets one

Each step runs the train net's passes through the pycaffe net (slim.caffe._runner), so after it every blob holds the
data and diff of the step's last pass, as in Caffe, and a test the solver runs leaves its last batch in the test
net's blobs; the update itself is slim's (``slim.solver.Solver``).
"""

from __future__ import annotations

import warnings
from typing import Callable, ClassVar, List, Optional

from slim.caffe._mode import MIRRORS, current_device
from slim.caffe.net import Net
from slim.errors import SolverError
from slim.net import NetOutput
from slim.solver import Hook
from slim.solver import Solver as SlimSolver

__all__ = ["Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "get_solver"]


class _Passes:
    """The train net's forward and forward+backward for slim's Solver, run by the pycaffe net's layer runner."""

    def __init__(self, net: Net) -> None:
        self.runner = net._runner

    def forward(self) -> NetOutput:
        last = len(self.runner.graph.layers) - 1
        return self.runner.outputs(self.runner.forward(0, last))

    def forward_backward(self) -> NetOutput:
        last = len(self.runner.graph.layers) - 1
        loss = self.runner.forward(0, last)
        self.runner.backward(last, 0)
        return self.runner.outputs(loss)


class _TestPass:
    """A test net's forward for slim's evaluate, run by the pycaffe net so its blobs hold the last test batch."""

    def __init__(self, net: Net) -> None:
        self.runner = net._runner

    @property
    def graph(self):
        return self.runner.graph

    def __call__(self) -> NetOutput:
        last = len(self.runner.graph.layers) - 1
        return self.runner.outputs(self.runner.forward(0, last, record=False))


class _Callback(Hook):
    """pycaffe's ``add_callback(on_start, on_gradients_ready)`` as a slim solver hook."""

    def __init__(self, on_start: Callable[[], None], on_gradients_ready: Callable[[], None]) -> None:
        self.on_start = on_start
        self.on_gradients_ready = on_gradients_ready

    def before_step(self, solver) -> None:
        self.on_start()

    def after_backward(self, solver) -> None:
        self.on_gradients_ready()


class Solver:
    """A Caffe solver with pycaffe's interface; the subclasses fix the update rule, as pycaffe's classes do.

    Args:
        solver_file: the solver prototxt. Its nets are built on the device of the current mode.

    Attributes:
        net: the train net (a :class:`slim.caffe.Net`).
        test_nets: the test nets.
        slim_solver: the slim.solver.Solver underneath.
    """

    solver_type: ClassVar[Optional[str]] = None     # None: the file's ``type`` decides (get_solver)

    def __init__(self, solver_file) -> None:
        from slim.io import read_solver

        path = str(solver_file)
        param = read_solver(path)
        if self.solver_type is not None and param.type != self.solver_type:
            if param.HasField("type"):
                warnings.warn(f"{path}: the solver says type \"{param.type}\", but {type(self).__name__} runs "
                              f"\"{self.solver_type}\" (in pycaffe the class decides); use caffe.get_solver to follow "
                              f"the file.", UserWarning, stacklevel=2)
            param.type = self.solver_type
        self.slim_solver = SlimSolver(param, solver_path=path, device=current_device(),
                                      metrics=param.HasField("metrics_file"))
        self.net = Net._wrap(self.slim_solver.net, solver_owned=True)
        self.test_nets: List[Net] = [Net._wrap(n, solver_owned=True) for n in self.slim_solver.test_nets]
        self.slim_solver.passes = _Passes(self.net)
        self.slim_solver.test_passes = [_TestPass(n) for n in self.test_nets]
        self.slim_solver.rule.keep_steps = True     # after an update a param's diff is its step, as in Caffe

    @property
    def iter(self) -> int:
        """Completed updates."""
        return self.slim_solver.iter

    @property
    def param(self):
        """The SolverParameter (caffe_pb2.SolverParameter)."""
        return self.slim_solver.param

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations: tests when due, forward/backward, update, snapshots when due."""
        self.net._follow_mode()
        MIRRORS.push()
        self.slim_solver.step(int(iters))

    def solve(self, resume_file: Optional[str] = None) -> None:
        """Train to max_iter (after restoring ``resume_file`` when given), as Caffe's ``Solver::Solve``."""
        if resume_file is not None:
            self.restore(resume_file)
        self.net._follow_mode()
        MIRRORS.push()
        self.slim_solver.solve()

    def restore(self, state_file) -> None:
        """Resume from a .solverstate (and the .caffemodel it names)."""
        MIRRORS.push()
        self.slim_solver.restore(str(state_file))

    def snapshot(self) -> Optional[str]:
        """Write ``<prefix>_iter_<iter>.caffemodel`` and ``.solverstate``; returns the solverstate's path."""
        MIRRORS.push()
        return self.slim_solver.snapshot()

    def apply_update(self) -> None:
        """Update the weights from the gradients now in the params' diffs (Caffe's ``ApplyUpdate``; iter stays)."""
        self.net._follow_mode()
        MIRRORS.push()
        self.slim_solver.apply_update()

    def add_callback(self, on_start: Callable[[], None], on_gradients_ready: Callable[[], None]) -> None:
        """Call ``on_start()`` at the start of every iteration and ``on_gradients_ready()`` once its gradients are
        complete, before the update (pycaffe's callbacks; Caffe's multi-GPU NCCL object is not supported)."""
        if not callable(on_start) or not callable(on_gradients_ready):
            raise SolverError("solver.add_callback(on_start, on_gradients_ready) takes two callables (pycaffe's NCCL "
                              "object is not supported: slim trains on several GPUs with `slim train --gpus`).")
        self.slim_solver.hooks.append(_Callback(on_start, on_gradients_ready))

    def share_weights(self, net: Net) -> None:
        """Make ``net`` use the train net's parameters for its layers of the same name."""
        net.share_with(self.net)

    def __repr__(self) -> str:
        return f"caffe.{type(self).__name__}({self.slim_solver.source!r}, iter {self.iter})"


def _solver_class(name: str) -> type:
    return type(f"{name}Solver", (Solver,), {
        "solver_type": name,
        "__doc__": f"pycaffe's {name}Solver: runs Caffe's {name} update rule whatever the file's ``type`` says.",
        "__module__": __name__,
    })


SGDSolver = _solver_class("SGD")
NesterovSolver = _solver_class("Nesterov")
AdaGradSolver = _solver_class("AdaGrad")
RMSPropSolver = _solver_class("RMSProp")
AdaDeltaSolver = _solver_class("AdaDelta")
AdamSolver = _solver_class("Adam")

_BY_TYPE = {cls.solver_type: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver,
                                             AdaDeltaSolver, AdamSolver)}


def get_solver(solver_file) -> Solver:
    """The solver the file's ``type`` names (pycaffe's ``caffe.get_solver``).

    Raises:
        SolverError: an unknown type.
    """
    from slim.io import read_solver

    kind = read_solver(str(solver_file)).type
    cls = _BY_TYPE.get(kind)
    if cls is None:
        raise SolverError(f"{solver_file}: solver type \"{kind}\" is unknown; the known types are "
                          f"{', '.join(_BY_TYPE)} (case-sensitive).")
    return cls(solver_file)

"""The solver: Caffe's training loop, learning-rate policies and update rules, and network slimming's sparsity
penalty.

Training, as ``caffe train`` does it::

    Solver("solvers/demo_digits_sparse.prototxt").solve()             # one process (slim.solver.solver)
    train(TrainConfig("solver.prototxt", gpus=[0, 1]))                # processes, devices, signals (slim.solver.train)

One update, as the training loop drives it::

    schedule = LrSchedule(solver, "solver.prototxt")                     # lr_policy and its fields, checked
    rule = create_rule(solver, net.learnable_params, "solver.prototxt")  # solver.type: SGD, Adam, ...
    penalty = create_sparsity(solver, net.learnable_params, net.scaling_factors(), "solver.prototxt")
    ...                                                                  # iter_size forward/backward passes
    rule.apply_update(schedule.rate(it), it, gradient_hooks=[penalty])
    it += 1

Snapshots save ``schedule.current_step`` and ``rule.history`` (SolverState.current_step, .history) and put
them back with ``schedule.current_step = state.current_step`` and ``rule.load_history(blobs)``.
"""

from slim.solver.lr import LR_POLICIES, LrSchedule
from slim.solver.rules import (RULES, AdaDelta, AdaGrad, Adam, LearnableParamLike, Nesterov, RMSProp, SGD,
                               UpdateRule, create_rule, register_rule)
from slim.solver.sparsity import GammaStats, SparsityPenalty, create_sparsity, gamma_stats
from slim.solver.evaluate import Evaluation, Score, evaluate
from slim.solver.signals import Action
from slim.solver.solver import Hook, Solver
from slim.solver.train import TrainConfig, train

__all__ = [
    "LR_POLICIES", "LrSchedule",
    "RULES", "UpdateRule", "LearnableParamLike", "SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam",
    "create_rule", "register_rule",
    "SparsityPenalty", "create_sparsity", "GammaStats", "gamma_stats",
    "Solver", "Hook", "Action", "TrainConfig", "train", "evaluate", "Evaluation", "Score",
]

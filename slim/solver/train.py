"""``slim train`` as a function: pick the processes and devices, build the solver, handle signals, solve.

    train(TrainConfig("solvers/demo_digits_sparse.prototxt"))                 # one process, CPU
    train(TrainConfig("solver.prototxt", gpus=[0, 1, 2, 3]))                  # four processes, NCCL
    train(TrainConfig("solver.prototxt", procs=2))                            # two CPU processes, gloo

Under torchrun (``torchrun --nproc_per_node 4 -m slim train --solver S --gpus all``) every process calls this
and the environment places it (see slim.solver.distributed). Without any flag, a solver that sets
``solver_mode: GPU`` explicitly trains on GPU ``device_id``, as ``caffe train`` does; on a machine without CUDA it
falls back to the CPU with a warning.

CPU processes started by ``--procs N`` use ``cores / N`` threads each (slim.threads.choose_threads: the cores free to
the process, or OMP_NUM_THREADS, SLIM_THREADS, ``--threads``), so they do not compete for the same cores.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

import torch

from slim import proto as pb
from slim.errors import SlimError, SolverError
from slim.solver.distributed import Distributed, free_port, from_environment, init_process_group, spawn
from slim.solver.signals import handle_signals, parse_action
from slim.threads import choose_threads, use_threads

__all__ = ["TrainConfig", "train"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    """What ``slim train`` was asked to do.

    Attributes:
        solver: the solver prototxt.
        weights: .caffemodel files to start from (``--weights``, overrides the solver's ``weights``).
        snapshot: a .solverstate to resume from (``--snapshot``).
        gpus: GPU ids (``--gpus 0,1``); an empty list means all GPUs; None trains on the CPU.
        procs: number of CPU processes (``--procs N``).
        amp: None, "bf16" or "fp16".
        channels_last: channels-last memory format.
        compile: torch.compile the train net's forward.
        sigint_effect: "stop", "snapshot" or "none".
        sighup_effect: "stop", "snapshot" or "none".
        hooks: slim.solver.Hook objects (picklable when processes are spawned).
        stages: NetState stages added to the train net's state (``caffe train --stage``).
        level: the train net's NetState level (``caffe train --level``).
        sources: ``--source LAYER[@PHASE]=PATH`` overrides of the nets' data sources (slim.sources).
        allow_unknown_fields: read the solver and its nets skipping fields slim's schema lacks (a Caffe fork's),
            with one warning per file; the nets are then handed to the solver inline, as read.
        log_level: the root process's logging level.
        progress: draw a progress bar when stdout is a terminal.
    """

    solver: str
    weights: Optional[Sequence[str]] = None
    snapshot: Optional[str] = None
    gpus: Optional[Sequence[int]] = None
    procs: Optional[int] = None
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    sigint_effect: str = "stop"
    sighup_effect: str = "snapshot"
    hooks: Sequence = ()
    stages: Sequence[str] = ()
    level: int = 0
    sources: Sequence[str] = ()
    allow_unknown_fields: bool = False
    log_level: int = logging.INFO
    progress: bool = True


def _read_solver(config: TrainConfig) -> "pb.SolverParameter":
    """The solver, with its nets' data sources overridden by ``--source`` (then inline: slim.sources); read leniently
    under ``--allow-unknown-fields``, nets included (then inline too, so nothing reads the files strictly later)."""
    from slim.io import read_solver

    param = read_solver(config.solver, allow_unknown_fields=config.allow_unknown_fields)
    if config.sources or config.allow_unknown_fields:
        from slim.sources import override_solver_sources

        param = override_solver_sources(param, config.solver, config.sources,
                                        allow_unknown_fields=config.allow_unknown_fields)
    return param


def _check(config: TrainConfig) -> None:
    """Flag combinations and the solver's own checks that need no net, before any process starts."""
    from slim.solver.lr import LrSchedule
    from slim.solver.nets import solver_nets
    from slim.solver.rules import RULES

    parse_action(config.sigint_effect, "--sigint-effect")
    parse_action(config.sighup_effect, "--sighup-effect")
    if config.weights is not None and config.snapshot is not None:
        raise SolverError("--weights and --snapshot were both given; --snapshot resumes a run (its weights come from "
                          "the snapshot), --weights starts one from a caffemodel. Give one of them.")
    if config.gpus is not None and config.procs is not None:
        raise SolverError("--gpus and --procs were both given; --gpus starts one process per GPU, --procs N CPU "
                          "processes. Give one of them.")
    if config.procs is not None and config.procs < 1:
        raise SolverError(f"--procs must be at least 1, found {config.procs}.")
    if config.procs is not None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise SolverError("--procs was given to a process that torchrun started (WORLD_SIZE is set); torchrun already "
                          "starts the processes. Drop --procs, or run without torchrun.")
    if not os.path.exists(config.solver):
        raise SolverError(f"--solver {config.solver} does not exist. Give the path of a solver prototxt.")
    param = _read_solver(config)
    LrSchedule(param, config.solver)
    if param.type not in RULES:
        raise SolverError(f"{config.solver}: solver type \"{param.type}\" is unknown; the known types are "
                          f"{', '.join(RULES)} (case-sensitive).")
    solver_nets(param, config.solver)


def _gpu_ids(config: TrainConfig) -> Optional[list[int]]:
    """The GPUs to train on (None: CPU), checked against the machine."""
    gpus = config.gpus
    if gpus is None and config.procs is None:
        from slim.io import read_solver

        param = read_solver(config.solver, allow_unknown_fields=config.allow_unknown_fields)
        if param.HasField("solver_mode") and param.solver_mode == pb.SolverParameter.GPU:
            if torch.cuda.is_available():
                return [int(param.device_id)]
            warnings.warn(f"{config.solver} sets solver_mode: GPU but CUDA is not available; training on the CPU.",
                          stacklevel=3)
        return None
    if gpus is None:
        return None
    if not torch.cuda.is_available():
        raise SolverError("--gpus was given but CUDA is not available on this machine (torch "
                          f"{torch.__version__}). Train on the CPU without --gpus, or with --procs N.")
    count = torch.cuda.device_count()
    ids = list(gpus) if gpus else list(range(count))
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise SolverError(f"--gpus names GPU {bad[0]}, but this machine has {count} (0..{count - 1}).")
    if len(set(ids)) != len(ids):
        raise SolverError(f"--gpus lists a GPU twice ({ids}); give each GPU once.")
    return ids


def _solve(config: TrainConfig, dist: Distributed, progress) -> bool:
    from slim.solver.solver import Solver

    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    param = _read_solver(config)
    # caffe train: --level and --stage go into the train net's state.
    if config.level:
        param.train_state.level = config.level
    if config.stages:
        param.train_state.stage.extend(config.stages)
    solver = Solver(param, solver_path=config.solver, weights=config.weights, snapshot=config.snapshot, dist=dist,
                    amp=config.amp, channels_last=config.channels_last, compile=config.compile, hooks=config.hooks,
                    progress=progress)
    with handle_signals(solver, config.sigint_effect, config.sighup_effect):
        return solver.solve()


def _worker(index: int, config: TrainConfig, port: int, gpu_ids: Optional[list[int]], nprocs: int) -> None:
    """One spawned training process."""
    from slim.solver.logs import setup_logging

    progress = setup_logging(index, level=config.log_level, progress=config.progress)
    if gpu_ids is None:
        use_threads(choose_threads(procs=nprocs))  # `slim train` chose already: OMP_NUM_THREADS carries its choice
    device = torch.device("cuda", gpu_ids[index]) if gpu_ids is not None else torch.device("cpu")
    dist = None
    try:
        dist = init_process_group(index, nprocs, device, init_method=f"tcp://127.0.0.1:{port}", local_rank=index)
        _solve(config, dist, progress)
    except SlimError as e:
        if getattr(e, "reported_elsewhere", False):
            # Another process reports the failure and exits with an error; this one leaves quietly, so that the
            # launcher waits for that message instead of stopping its writer first.
            return
        print(f"slim train (process {index}): error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist is not None:
            dist.close()


def train(config: TrainConfig, progress=None) -> bool:
    """Train as ``caffe train`` does, in one process or several.

    Args:
        config: the command's options.
        progress: a progress bar for a single process (``setup_logging`` returns one).

    Returns:
        True when training reached max_iter, False when a signal stopped it (with spawned processes: True
        once all of them exited cleanly, either way).

    Raises:
        SolverError, NetError, DataError, WeightsError, ParseError: before training starts, for bad input; during
            training, when the loss diverges or a process fails.
    """
    _check(config)
    env_dist = from_environment(config.gpus) if config.procs is None else None
    if env_dist is not None:
        try:
            return _solve(config, env_dist, progress if env_dist.is_root else None)
        finally:
            env_dist.close()
    gpu_ids = _gpu_ids(config)
    nprocs = len(gpu_ids) if gpu_ids is not None else (config.procs or 1)
    if gpu_ids is not None and config.procs is None and nprocs == 1:
        return _solve(config, Distributed(device=torch.device("cuda", gpu_ids[0])), progress)
    if nprocs == 1:
        return _solve(config, Distributed(), progress)
    _log.info("Starting %d training processes (%s)", nprocs,
              "NCCL on GPUs " + ",".join(map(str, gpu_ids)) if gpu_ids is not None else "gloo on the CPU")
    env = {}
    if gpu_ids is None and "GLOO_SOCKET_IFNAME" not in os.environ and sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # all processes are on this machine: talk over loopback
    spawn(_worker, (config, free_port(), gpu_ids, nprocs), nprocs, env=env)
    return True

"""Benchmark: network slimming's procedure on Fashion-MNIST, end to end, beside l1 filter norms (and lasso) at the
same MACs: accuracy, parameters, conv+FC MACs and measured CPU latency.

The procedure (Liu et al., ICCV 2017), on the zoo's vgg7_fashion (or ``--net``):

1. split: a fixed 5,000 images of the 60,000 training images are held out as the validation split (the same for
   every seed and method); the models train on the rest. The 10,000 test images are used for the reported test
   accuracy only, never for a choice;
2. baseline: train from scratch; sparse: train from scratch with the L1 penalty lambda on the channel scaling
   factors. With several ``--lambdas`` (full mode: the paper's 1e-4 and larger ones, since these runs are ~25x
   shorter than the paper's 160 epochs), lambda is chosen on seed 0 as the one whose slimming-pruned net at the
   highest level has the best *validation* accuracy after fine-tuning;
3. prune at each level (50% and 70% of the channels) by slimming (|gamma| of the sparse model), then by each other
   method at the same conv+FC MACs (``PrunePolicy(target_macs=...)``, within 1%) from the baseline model, as their
   papers prune a normally trained model (l1: Li et al. 2017; lasso: He et al. 2017, calibrated on training
   images);
4. fine-tune every pruned net (same schedule for all methods) and report test accuracy (mean and spread over the
   seeds), params, MACs, and the CPU forward latency at batch 1 and 64 (medians of interleaved runs on seed 0's
   nets) with the measured speed-up's ratio to the MAC ratio.

Outputs in ``--out``: table.md (the paper's Table 1 layout), results.csv, results.json, accuracy_vs_macs.png, the
trained models under models/ (each with a JSON sidecar of the settings that made it: a rerun, or adding the lasso
rows, reuses every model whose settings match and trains only what is missing), pruned nets under pruned/.

Usage:
    python benchmarks/bench_fashion.py --quick                  # ~10 minutes on a 2-core CPU
    python benchmarks/bench_fashion.py --out /work/fashion_full  # full mode: 2 seeds, lambda chosen on validation
    python benchmarks/bench_fashion.py --data DIR                # another MNIST-format folder (default: Debian's)

The Fashion-MNIST files come from Debian's package (``apt-get install dataset-fashion-mnist``, installed in
/usr/share/datasets/fashion-mnist); any folder with the four IDX files (raw or .gz) works.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slim import proto as pb  # noqa: E402
from slim.errors import SlimError  # noqa: E402
from slim.io.atomic import atomic_write  # noqa: E402
from slim.zoo import FASHION_MNIST_SOURCE  # noqa: E402

import _fashion_report as report  # noqa: E402

#: Methods run by default; lasso joins when slim.prune has it.
BASE_METHODS = ("slimming", "l1")
#: The method whose global percent defines each level; the others prune to its MACs.
REFERENCE = "slimming"
#: Which trained model each method prunes: slimming the sparse one, the others the baseline (as their papers).
SOURCE_MODEL = {"slimming": "sparse"}
SPLIT_SEED = 20170  # the validation split's permutation seed, fixed so every run holds out the same images


@dataclasses.dataclass
class Settings:
    """Everything that decides the results (and the cache keys of the models)."""

    net: str = "vgg7_fashion"
    seeds: int = 2
    epochs: float = 6.0              # baseline and sparse training
    finetune_epochs: float = 2.0
    levels: Sequence[float] = (0.5, 0.7)
    methods: Sequence[str] = ()
    lambdas: Sequence[float] = (1e-4, 1e-3, 3e-3)
    val_count: int = 5000
    train_limit: int = 0             # 0: every remaining training image
    batch: int = 64
    base_lr: float = 0.1
    finetune_lr: float = 0.01
    weight_decay: float = 1e-4
    latency_repeats: int = 50       # timed runs per net at batch 64; batch 1 gets ten times as many

    def key(self) -> dict:
        return dataclasses.asdict(self)


FULL = Settings()
# Quick: one seed, a third of the training images, short schedules, and no selection run: lambda 3e-3, set a priori
# so that lambda x (the sum of the learning rates) of the full schedule is near the paper's (the _sparse_tuned
# solver's comment).
QUICK = Settings(seeds=1, epochs=3.0, finetune_epochs=1.0, lambdas=(3e-3,), train_limit=20000, latency_repeats=30)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ----- data ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    """The IDX files of one split and its size."""

    images: str
    labels: str
    count: int


def prepare_data(source: str, out: Path, settings: Settings) -> Dict[str, Split]:
    """Writes the train and validation splits of ``source``'s training set as IDX files under out/data (once per
    split setting) and returns them with the test split (``source``'s own t10k files)."""
    from slim.data.idx import idx_pair, load_idx, write_idx

    where = f"--data {source}"
    train_pair = idx_pair(source, True, where=where)
    test_pair = idx_pair(source, False, where=where)
    test = load_idx(*test_pair, where=where)
    spec = {"source": str(Path(source).resolve()), "files": [str(p) for p in train_pair],
            "sizes": [p.stat().st_size for p in train_pair], "val_count": settings.val_count,
            "train_limit": settings.train_limit, "seed": SPLIT_SEED}
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "split.json"
    names = {k: (folder / f"{k}-images-idx3-ubyte", folder / f"{k}-labels-idx1-ubyte") for k in ("train", "val")}
    written = all(path.is_file() for pair in names.values() for path in pair)
    if not written or not stamp.is_file() or json.loads(stamp.read_text()).get("spec") != spec:
        full = load_idx(*train_pair, where=where)
        if settings.val_count >= full.num_samples:
            raise SlimError(f"--val {settings.val_count} leaves no training images of the {full.num_samples} in "
                            f"{source}; hold out fewer.")
        order = np.random.default_rng(SPLIT_SEED).permutation(full.num_samples)
        val_idx, train_idx = np.sort(order[:settings.val_count]), order[settings.val_count:]
        if settings.train_limit:
            train_idx = train_idx[:settings.train_limit]
        train_idx = np.sort(train_idx)
        for key, idx in (("train", train_idx), ("val", val_idx)):
            write_idx(names[key][0], full.images[idx, 0])
            write_idx(names[key][1], full.labels[idx].astype(np.uint8))
        with atomic_write(stamp, "w") as f:
            f.write(json.dumps({"spec": spec, "counts": {"train": len(train_idx), "val": len(val_idx)}}))
    counts = json.loads(stamp.read_text())["counts"]
    splits = {k: Split(str(names[k][0]), str(names[k][1]), counts[k]) for k in ("train", "val")}
    splits["test"] = Split(str(test_pair[0]), str(test_pair[1]), test.num_samples)
    return splits


def _divisor_batch(count: int, cap: int = 100) -> int:
    """The largest batch <= cap that divides ``count``, so a test pass reads every image exactly once."""
    return max(b for b in range(1, min(cap, count) + 1) if count % b == 0)


def with_data(net: "pb.NetParameter", train: Split, test: Split) -> "pb.NetParameter":
    """A copy of a zoo (or pruned) net whose TRAIN data layer reads ``train`` and TEST data layer ``test``; the
    crop (the zoo's 28x28) follows the files' image size, so any MNIST-format folder fits."""
    from slim.data.idx import read_idx_header

    side = read_idx_header(test.images).dims[1:]
    if side[0] != side[1]:
        raise SlimError(f"{test.images} holds {side[0]}x{side[1]} images; the benchmark's nets take square images.")
    out = pb.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        if layer.type != "SlimData":
            continue
        p = layer.slim_data_param
        if p.dataset != pb.SlimDataParameter.IDX:
            raise SlimError(f"--net: data layer {layer.name!r} is not an IDX SlimData layer; the benchmark needs a "
                            "Fashion-MNIST net of the zoo (vgg7_fashion, resnet20_fashion).")
        split = train if layer.include[0].phase == pb.TRAIN else test
        p.ClearField("source")
        p.image_file, p.label_file = split.images, split.labels
        layer.transform_param.crop_size = side[0]
        if layer.include[0].phase == pb.TEST:
            p.batch_size = _divisor_batch(split.count)
    return out


# ----- training, evaluation, caching -------------------------------------------------------------------------------

def make_solver(net: str, iters: int, lr: float, weight_decay: float, penalty: float, seed: int,
                prefix: str) -> "pb.SolverParameter":
    """The benchmark's solver (solvers/vgg7_fashion_*.prototxt are its full-mode settings on all 60,000 training
    images): network slimming's recipe, SGD with momentum 0.9, ``lr`` divided by 10 at 50% and 75% of ``iters``,
    weight decay, the sparsity penalty on the channel scaling factors when ``penalty`` is set; no test during
    training (the benchmark evaluates afterwards) and no snapshots."""
    param = pb.SolverParameter(net=net, base_lr=lr, lr_policy="multistep", gamma=0.1, max_iter=iters, type="SGD",
                               momentum=0.9, weight_decay=weight_decay, display=max(1, iters // 10),
                               average_loss=20, snapshot=0, snapshot_prefix=prefix, random_seed=seed)
    param.stepvalue.extend([max(1, iters // 2), max(1, iters * 3 // 4)])
    if penalty:
        param.sparsity.penalty = penalty
    return param


class Runner:
    """Trains, prunes and evaluates, caching every trained model under out/models by the settings that made it."""

    def __init__(self, out: Path, settings: Settings, splits: Dict[str, Split], verbose: bool = False,
                 device: str = "cpu"):
        from slim.io import read_net
        from slim.zoo import ZOO

        if settings.net not in ZOO:
            raise SlimError(f"--net {settings.net} is not a zoo net; Fashion-MNIST nets: vgg7_fashion, "
                            "resnet20_fashion.")
        self.out, self.settings, self.splits, self.verbose, self.device = out, settings, splits, verbose, device
        for sub in ("models", "pruned", "nets"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.net = ZOO[settings.net]()
        self.split_key = json.loads((out / "data" / "split.json").read_text())["spec"]
        self.trained = 0  # models trained by this run (not read from the cache)
        self._read_net = read_net

    # -- nets
    def write_net(self, net: "pb.NetParameter", name: str) -> Path:
        from slim.io import write_net

        path = self.out / "nets" / f"{name}.prototxt"
        write_net(with_data(net, self.splits["train"], self.splits["test"]), path)
        return path

    # -- training
    def train(self, name: str, net: "pb.NetParameter", seed: int, *, epochs: float, lr: float, penalty: float = 0.0,
              weights: Optional[str] = None, parent: Optional[dict] = None) -> dict:
        """Train (or reuse) a model; returns its record (path, key, seconds, accuracies)."""
        s = self.settings
        key = {"name": name, "net": _digest(str(net)), "seed": seed, "epochs": epochs, "lr": lr, "penalty": penalty,
               "batch": s.batch, "weight_decay": s.weight_decay, "split": self.split_key, "parent": parent}
        tag = f"{name}_s{seed}_{_digest(key)}"
        model, sidecar = self.out / "models" / f"{tag}.caffemodel", self.out / "models" / f"{tag}.json"
        if model.is_file() and sidecar.is_file():
            record = json.loads(sidecar.read_text())
            if record.get("key") == json.loads(json.dumps(key, default=str)):
                _log(f"{name} (seed {seed}): cached {model.name}")
                return record
        net_path = self.write_net(net, tag)
        iters = max(1, math.ceil(epochs * self.splits["train"].count / s.batch))
        param = make_solver(str(net_path), iters, lr, s.weight_decay, penalty, seed + 1, str(self.out / "models" / tag))
        param.snapshot_after_train = False
        from slim.io import write_solver
        from slim.solver.solver import Solver

        write_solver(param, self.out / "nets" / f"{tag}_solver.prototxt")
        # The metrics file is appended to: drop what an interrupted run of the same model left.
        Path(param.snapshot_prefix + ".metrics.jsonl").unlink(missing_ok=True)
        _log(f"{name} (seed {seed}): training {iters} iterations ({epochs:g} epochs of "
             f"{self.splits['train'].count} images, lr {lr:g}{f', penalty {penalty:g}' if penalty else ''})")
        start = time.perf_counter()
        with _quiet(not self.verbose):
            solver = Solver(param, solver_path=str(self.out / "nets" / f"{tag}_solver.prototxt"),
                            weights=[weights] if weights else None, device=self.device)
            solver.solve()
        seconds = time.perf_counter() - start
        solver.net.save(model)
        self.trained += 1
        record = {"key": key, "model": str(model), "net": str(net_path), "seconds": seconds, "iters": iters,
                  "images_per_s": iters * s.batch / seconds, "loss": float(solver.smoothed_loss)}
        record.update(self.accuracies(net, str(model)))
        with atomic_write(sidecar, "w") as f:  # written last: its presence marks the model complete
            f.write(json.dumps(record, indent=1, default=str))
        _log(f"{name} (seed {seed}): {seconds:.0f} s ({record['images_per_s']:.0f} images/s), val "
             f"{record['val'] * 100:.2f}%, test {record['test'] * 100:.2f}%")
        return json.loads(sidecar.read_text())

    def accuracies(self, net: "pb.NetParameter", weights: str) -> Dict[str, float]:
        """Validation and test accuracy of ``net`` with ``weights`` (every image of each split once)."""
        from slim.net import Net
        from slim.solver.evaluate import evaluate

        out = {}
        for split in ("val", "test"):
            data = self.splits[split]
            test_net = with_data(net, self.splits["train"], data)
            model = Net(test_net, weights=weights, phase="TEST", device=self.device)
            batch = _divisor_batch(data.count)
            ev = evaluate(model, data.count // batch)
            out[split] = float(ev.as_dict()["accuracy"])
        return out

    # -- pruning
    def prune(self, method: str, source: dict, policy, tag: str) -> dict:
        """Prune ``source``'s model with ``policy`` (a slim.prune.PrunePolicy); returns the pruned net's record.
        A prune of the same model with the same policy is reused (lasso's calibration takes minutes)."""
        from slim.deploy import make_deploy
        from slim.flops import calflop
        from slim.prune import prune_net, write_pruned

        key = {"source": source["key"], "policy": policy.describe()}
        tag = f"{tag}_{_digest(key)}"
        sidecar = self.out / "pruned" / f"{tag}.record.json"
        if sidecar.is_file():
            record = json.loads(sidecar.read_text())
            if record.get("key") == json.loads(json.dumps(key, default=str)) and Path(record["caffemodel"]).is_file():
                _log(f"{method} ({tag}): cached prune")
                record["net_param"] = self._read_net(record["prototxt"])
                return record
        net_path = source["net"]
        start = time.perf_counter()
        result = prune_net(net_path, source["model"], policy)
        paths = write_pruned(result, self.out / "pruned" / tag)
        seconds = time.perf_counter() - start
        cost = calflop(make_deploy(result.net))
        record = {"method": method, "prototxt": str(paths["prototxt"]), "caffemodel": str(paths["caffemodel"]),
                  "params": cost.params, "macs": cost.macs("conv+fc"), "fraction": result.report.fraction,
                  "prune_seconds": seconds, "policy": policy.describe()}
        pruned_net = self._read_net(paths["prototxt"])
        record.update({f"{k}_before_ft": v for k, v in self.accuracies(pruned_net, record["caffemodel"]).items()})
        record["key"] = key
        with atomic_write(sidecar, "w") as f:
            f.write(json.dumps(record, indent=1, default=str))
        record["net_param"] = pruned_net
        return record


class _quiet:
    """Silence slim's INFO lines (training logs) unless verbose."""

    def __init__(self, on: bool):
        self.on, self.logger = on, logging.getLogger("slim")

    def __enter__(self):
        self.old = self.logger.level
        if self.on:
            self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.logger.setLevel(self.old)


# ----- the procedure ---------------------------------------------------------------------------------------------

def available_methods(requested: Sequence[str] = ()) -> List[str]:
    """The methods to run: ``requested``, or slimming, l1 and lasso when slim.prune has it. Slimming comes first:
    its percent defines the levels."""
    from slim.prune import criteria

    known = criteria()
    methods = list(requested) or list(BASE_METHODS) + (["lasso"] if "lasso" in known else [])
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SlimError(f"--methods {', '.join(unknown)}: not a pruning criterion of slim ({', '.join(known)}).")
    if REFERENCE not in methods:
        raise SlimError(f"--methods must include {REFERENCE}: its percent defines each level's MACs.")
    return [REFERENCE] + [m for m in methods if m != REFERENCE]


def policy_for(method: str, level: float, target_macs: Optional[float]):
    """slimming prunes ``level`` of the channels; every other method prunes to slimming's MACs at that level."""
    from slim.prune import PrunePolicy

    if method == REFERENCE:
        return PrunePolicy(criterion=method, percent=level)
    return PrunePolicy(criterion=method, target_macs=target_macs)


def prune_and_finetune(runner: Runner, seed: int, models: Dict[str, dict], method: str, level: float,
                       target_macs: Optional[float]) -> dict:
    """One row for one seed: prune ``models[SOURCE_MODEL[method]]``, evaluate, fine-tune, evaluate."""
    s = runner.settings
    source = models[SOURCE_MODEL.get(method, "baseline")]
    tag = f"{method}_{int(round(level * 100))}_s{seed}"
    pruned = runner.prune(method, source, policy_for(method, level, target_macs), tag)
    fine = runner.train(f"finetune_{method}_{int(round(level * 100))}", pruned.pop("net_param"), seed,
                        epochs=s.finetune_epochs, lr=s.finetune_lr, weights=pruned["caffemodel"],
                        parent={"source": source["key"], "method": method, "level": level,
                                "policy": pruned["policy"]})
    row = dict(pruned, seed=seed, level=level, source=SOURCE_MODEL.get(method, "baseline"),
               val=fine["val"], test=fine["test"], finetune_model=fine["model"], finetune_net=fine["net"],
               finetune_seconds=fine["seconds"])
    _log(f"  {method} {level:.0%} seed {seed}: {row['fraction']:.1%} of channels, {row['macs'] / 1e6:.2f}M MACs, "
         f"test {row['test_before_ft'] * 100:.2f}% -> {row['test'] * 100:.2f}% after fine-tuning")
    return row


def select_lambda(runner: Runner, baseline: dict) -> dict:
    """Sparse-train seed 0 with each candidate lambda, prune the highest level by slimming, fine-tune, and keep the
    lambda of the best validation accuracy (the test split is not looked at)."""
    s = runner.settings
    level = max(s.levels)
    trials = []
    for lam in s.lambdas:
        sparse = runner.train("sparse", runner.net, 0, epochs=s.epochs, lr=s.base_lr, penalty=lam)
        row = prune_and_finetune(runner, 0, {"sparse": sparse, "baseline": baseline}, REFERENCE, level, None)
        trials.append({"lambda": lam, "sparse_val": sparse["val"], "pruned_val_before_ft": row["val_before_ft"],
                       "pruned_val": row["val"], "fraction": row["fraction"]})
    best = max(trials, key=lambda t: (t["pruned_val"], -t["lambda"]))
    _log(f"lambda chosen on validation: {best['lambda']:g} (" + ", ".join(
        f"{t['lambda']:g}: {t['pruned_val'] * 100:.2f}%" for t in trials) + f" at {level:.0%} pruned)")
    return {"level": level, "trials": trials, "chosen": best["lambda"]}


def measure(rows: List[dict], baseline: dict, repeats: int) -> Dict[str, dict]:
    """CPU forward latency at batch 1 and 64 of the baseline and every row's net (seed 0), interleaved."""
    from slim.flops import measure_latencies
    from slim.io import read_net

    nets = [read_net(baseline["net"])] + [read_net(r["prototxt"]) for r in rows]
    weights = [baseline["model"]] + [r["finetune_model"] for r in rows]
    out = {}
    for batch in (1, 64):
        # A batch-1 forward of these nets takes about a millisecond, less than a scheduler slice of a shared
        # machine: ten times the runs keep its median steady.
        runs = repeats * 10 if batch == 1 else repeats
        lat = measure_latencies(nets, weights=weights, batch=batch, repeats=runs, warmup=3, device="cpu")
        out[str(batch)] = {"baseline": lat[0].median * 1e3, "rows": [x.median * 1e3 for x in lat[1:]],
                           "threads": lat[0].threads, "repeats": runs,
                           "min": [min(x.times) * 1e3 for x in lat]}
    # On a shared machine the medians include waits for a core; the load says how much to trust them.
    out["load_average"] = os.getloadavg()[0]
    out["keys"] = [[r["method"], r["level"]] for r in rows]  # which row each entry of "rows" times
    return out


def run(settings: Settings, data: str, out: Path, *, verbose: bool = False, device: str = "cpu") -> dict:
    """The whole benchmark; returns (and writes) its results. ``device`` trains and evaluates (e.g. "cuda"); the
    latencies are always measured on the CPU.

    Seed 0 runs to the end first (lambda selection included), then each further seed; the outputs are written after
    every seed, so a long run cut short still leaves a table (marked partial).
    """
    import torch

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings.methods = available_methods(settings.methods)
    _log(f"settings: {json.dumps(settings.key(), default=str)}")
    splits = prepare_data(data, out, settings)
    _log("splits: " + ", ".join(f"{k} {v.count}" for k, v in splits.items()))
    runner = Runner(out, settings, splits, verbose, device)
    from slim.deploy import make_deploy
    from slim.flops import calflop

    cost = calflop(make_deploy(with_data(runner.net, splits["train"], splits["test"])))  # at the files' image size
    baselines: Dict[int, dict] = {}
    sparse: Dict[int, dict] = {}
    rows: List[dict] = []
    failed: Dict[str, str] = {}  # method -> its error: the reference (slimming) fails the run, others are left out
    selection, latency, lam = None, None, settings.lambdas[0]
    for seed in range(settings.seeds):
        baselines[seed] = runner.train("baseline", runner.net, seed, epochs=settings.epochs, lr=settings.base_lr)
        if seed == 0 and len(settings.lambdas) > 1:
            selection = select_lambda(runner, baselines[0])
            lam = selection["chosen"]
        sparse[seed] = runner.train("sparse", runner.net, seed, epochs=settings.epochs, lr=settings.base_lr,
                                    penalty=lam)
        models = {"baseline": baselines[seed], "sparse": sparse[seed]}
        for level in settings.levels:
            ref = prune_and_finetune(runner, seed, models, REFERENCE, level, None)
            rows.append(ref)
            for method in settings.methods[1:]:
                if method in failed:
                    continue
                try:
                    rows.append(prune_and_finetune(runner, seed, models, method, level, ref["macs"]))
                except Exception as e:  # noqa: BLE001 - one method's failure must not cost an hour-long run
                    failed[method] = f"{type(e).__name__}: {e}"
                    _log(f"  {method} FAILED at {level:.0%}, seed {seed} ({failed[method]}); its rows are left out "
                         "of the results (rerun with the same --out once it is fixed: trained models are reused)")
        rows = [r for r in rows if r["method"] not in failed]
        if latency is None:  # seed 0's nets (rows of a method failing later are dropped; their entries unused)
            _log("measuring CPU latency (batch 1 and 64, interleaved)")
            latency = measure([r for r in rows if r["seed"] == 0], baselines[0], settings.latency_repeats)
        results = {
            "settings": settings.key(), "seeds_done": seed + 1, "lambda": lam, "selection": selection, "data": data,
            "splits": {k: dataclasses.asdict(v) for k, v in splits.items()},
            "baseline": {"params": cost.params, "macs": cost.macs("conv+fc"),
                         "seeds": [dict(baselines[k], seed=k) for k in baselines],
                         "sparse": [dict(sparse[k], seed=k) for k in sparse]},
            "rows": rows, "failed": failed, "latency": latency, "trained_now": runner.trained,
            "seconds": time.perf_counter() - started,
            "machine": {"device": device, "cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d %H:%M %Z")},
        }
        files = report.write_all(results, out)
        results["files"] = files
        _log(f"{seed + 1} of {settings.seeds} seeds done after {results['seconds'] / 60:.1f} min; trained "
             f"{runner.trained} models in this run; wrote " + ", ".join(files.values()))
    print(report.read_table(out))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 20,000 training images, short schedules, "
                        "no lambda selection (~10 minutes on a 2-core CPU)")
    parser.add_argument("--data", default=FASHION_MNIST_SOURCE, help="folder of the four MNIST-format IDX files "
                        f"(default {FASHION_MNIST_SOURCE}, Debian's dataset-fashion-mnist)")
    parser.add_argument("--out", default=None, help="output folder (default fashion_bench or fashion_bench_quick)")
    parser.add_argument("--net", help="zoo net (default vgg7_fashion)")
    parser.add_argument("--seeds", type=int, help="seeds (full mode 2)")
    parser.add_argument("--epochs", type=float, help="epochs of baseline and sparse training")
    parser.add_argument("--finetune-epochs", type=float, help="epochs of fine-tuning")
    parser.add_argument("--levels", type=float, nargs="+", help="fractions of channels pruned by slimming")
    parser.add_argument("--methods", nargs="+", help="criteria (default slimming l1, and lasso where available)")
    parser.add_argument("--lambdas", type=float, nargs="+", help="sparsity penalties; more than one: chosen on the "
                        "validation split")
    parser.add_argument("--val", type=int, help="validation images held out of the training set (default 5000)")
    parser.add_argument("--train-limit", type=int, help="use at most this many training images (0: all)")
    parser.add_argument("--repeats", type=int, help="timed runs per net and batch size")
    parser.add_argument("--threads", type=int, help="torch CPU threads for training and timing (default: torch's "
                        "own choice; 1 can be faster on a machine whose cores are busy with other work)")
    parser.add_argument("--device", default="cpu", help="where to train and evaluate (cpu, cuda, cuda:1); "
                        "latency is measured on the CPU")
    parser.add_argument("--verbose", action="store_true", help="show slim's training log")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else FULL)
    for field, value in (("net", args.net), ("seeds", args.seeds), ("epochs", args.epochs),
                         ("finetune_epochs", args.finetune_epochs), ("levels", args.levels),
                         ("methods", args.methods), ("lambdas", args.lambdas), ("val_count", args.val),
                         ("train_limit", args.train_limit), ("latency_repeats", args.repeats)):
        if value is not None:
            setattr(settings, field, tuple(value) if isinstance(value, list) else value)
    if settings.seeds < 1 or settings.epochs <= 0 or settings.finetune_epochs <= 0 or not settings.levels:
        parser.error("--seeds must be >= 1, --epochs and --finetune-epochs > 0, and --levels non-empty")
    if any(not 0 < p < 1 for p in settings.levels):
        parser.error("--levels are fractions in (0, 1)")
    out = Path(args.out or ("fashion_bench_quick" if args.quick else "fashion_bench"))
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(settings, args.data, out, verbose=args.verbose, device=args.device)
    except SlimError as e:
        print(f"bench_fashion: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

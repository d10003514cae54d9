"""Checking an ONNX file against slim with ONNX Runtime (an optional extra): the same random inputs through both,
the largest difference reported."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from slim.interop._deps import require

__all__ = ["Comparison", "run_onnxruntime", "compare_with_onnxruntime", "random_inputs", "difference"]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """slim's outputs against ONNX Runtime's on the same inputs.

    Attributes:
        max_abs: the largest absolute difference over all outputs.
        max_rel: the largest, over outputs, of (largest absolute difference) / (largest |ONNX Runtime value|).
        batch: the batch size compared.
        outputs: the output names compared.
        runtime: "onnxruntime X.Y.Z".
        nonfinite: output values that are NaN or infinite in both (they agree, but say little).
    """

    max_abs: float
    max_rel: float
    batch: int
    outputs: tuple
    runtime: str
    nonfinite: int = 0

    def __str__(self) -> str:
        text = (f"{self.runtime} vs slim at batch {self.batch}: largest difference {self.max_abs:.3g} "
                f"({self.max_rel:.3g} relative to the largest output value) over {', '.join(self.outputs)}")
        if self.nonfinite:
            text += (f"; {self.nonfinite} output values are NaN or infinite in both (untrained weights or BatchNorm "
                     f"statistics of 0 can do that: check with the trained weights)")
        return text


def run_onnxruntime(path: str, inputs: Mapping[str, np.ndarray], threads: Optional[int] = None) \
        -> Dict[str, np.ndarray]:
    """Run an ONNX file on the CPU with ONNX Runtime; returns output name -> array."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about shape-inference details it then handles
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: np.ascontiguousarray(v, dtype=np.float32)
                                              for k, v in inputs.items()})))


def random_inputs(net, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Standard-normal inputs for every input blob of a slim.Net, with the given batch size."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((batch,) + tuple(net.graph.shapes[name][1:])).astype(np.float32)
            for name in net.inputs}


def difference(ours: np.ndarray, reference: np.ndarray) -> Tuple[float, float]:
    """(largest absolute difference, that / the largest |reference| value) of two arrays of one shape.

    NaN in both at one position agrees; NaN (or inf) on one side only is an infinite difference, which Python's
    max() and numpy's comparisons would otherwise let pass.
    """
    a, b = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if not a.size:
        return 0.0, 0.0
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    same = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
    diff[same] = 0.0
    diff[np.isnan(diff)] = np.inf
    largest = float(diff.max())
    finite = np.abs(b[np.isfinite(b)])
    scale = float(finite.max()) if finite.size else 0.0
    return largest, (largest / scale if scale > 0 else largest)


def compare_with_onnxruntime(net, path, batch: int = 3, seed: int = 0,
                             inputs: Optional[Mapping[str, np.ndarray]] = None) -> Comparison:
    """Run ``net`` (a slim.Net, evaluated as it is) and the ONNX file on the same inputs and compare every output
    the two share by name (all of the net's outputs must be in the file)."""
    import torch

    ort = require("onnxruntime")
    inputs = dict(inputs) if inputs is not None else random_inputs(net, batch, seed)
    with torch.no_grad():
        ours = net(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    theirs = run_onnxruntime(path, inputs)
    missing = [name for name in ours if name not in theirs]
    if missing:
        from slim.errors import InteropError

        raise InteropError(f"{os.fspath(path)} has no output named {', '.join(missing)}; its outputs are "
                           f"{', '.join(theirs)}.")
    max_abs, max_rel, nonfinite = 0.0, 0.0, 0
    names: List[str] = []
    for name, value in ours.items():
        a, b = value.detach().cpu().numpy().astype(np.float64), theirs[name].astype(np.float64)
        if a.shape != b.shape:
            from slim.errors import InteropError

            raise InteropError(f"output {name!r} has shape {a.shape} in slim and {b.shape} in ONNX Runtime.")
        diff, rel = difference(a, b)
        nonfinite += int(np.sum(~np.isfinite(a) & ~np.isfinite(b)))
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, rel)
        names.append(name)
    batch = next(iter(inputs.values())).shape[0] if inputs else batch
    return Comparison(max_abs, max_rel, batch, tuple(names), f"onnxruntime {ort.__version__}", nonfinite)

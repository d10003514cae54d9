"""slim net -> ONNX: any net slim builds (deploy, train/val through its deploy form, pruned), with a dynamic batch,
the net's own input and output names, a stated opset, and a check against ONNX Runtime when it is installed.

    from slim.interop import export_onnx
    result = export_onnx("pruned.prototxt", "pruned.onnx", weights="pruned.caffemodel")
    print(result)          # path, opset, exporter, inputs/outputs, and ONNX Runtime's largest difference

The net goes through torch's own exporter (``torch.onnx.export``): "dynamo" (torch's default; needs onnxscript) or
"legacy" (the TorchScript-based one). slim.Net needs no wrapper for either.

The file is written as every slim output is (slim.io.atomic.atomic_files): the exporter writes into a temporary
folder beside the destination, the file is checked there, and only then is it renamed into place, after any
external-data files the exporter wrote beside it (the dynamo exporter's ``OUT.onnx.data``, the legacy exporter's
one file per weight, above 2 GB of weights). A failure at any point leaves no partial file and the previous file,
if any, intact; a symbolic link planted at the name is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from slim import proto as pb
from slim.errors import InteropError
from slim.interop._deps import available, require
from slim.io.atomic import atomic_files
from slim.interop.runtime import Comparison, compare_with_onnxruntime

__all__ = ["ExportResult", "export_onnx", "DEFAULT_OPSET", "EXPORTERS"]

#: The opset written unless asked otherwise: read by ONNX Runtime >= 1.14, TensorRT >= 8.6 and OpenVINO >= 2023.
DEFAULT_OPSET = 18

EXPORTERS = ("dynamo", "legacy")

#: Above this many bytes of weights the file keeps them as external data (protobuf's limit is 2 GB).
_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclasses.dataclass
class ExportResult:
    """What ``export_onnx`` wrote.

    Attributes:
        path: the .onnx file.
        opset: its ONNX opset (standard domain).
        exporter: "dynamo" or "legacy".
        inputs, outputs: its graph input and output names (the net's blob names).
        dynamic_batch: whether the batch axis is dynamic (always, for slim's exports).
        check: ONNX Runtime against slim, or None when onnxruntime is not installed or the check was not asked.
        data_files: the external-data files written beside ``path`` (large models), or none.
    """

    path: str
    opset: int
    exporter: str
    inputs: Sequence[str]
    outputs: Sequence[str]
    dynamic_batch: bool = True
    check: Optional[Comparison] = None
    data_files: Sequence[str] = ()

    def __str__(self) -> str:
        lines = [f"wrote {self.path}: ONNX opset {self.opset} ({self.exporter} exporter), inputs "
                 f"{', '.join(self.inputs)} with a dynamic batch axis, outputs {', '.join(self.outputs)}"]
        if self.data_files:
            shown = ", ".join(os.path.basename(p) for p in self.data_files[:3])
            more = f" and {len(self.data_files) - 3} more" if len(self.data_files) > 3 else ""
            lines.append(f"its weights are external data beside it: {shown}{more} (keep them together)")
        lines.append(str(self.check) if self.check is not None else
                     "not checked against ONNX Runtime (pip install onnxruntime to check)")
        return "\n".join(lines)


@contextlib.contextmanager
def _quiet_torch_onnx():
    """torch.onnx logs progress and deprecation notices meant for its own users; slim states what it did itself."""
    import torch

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as sink:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
            try:
                yield
            finally:
                sink.close()
    finally:
        logger.setLevel(level)


def _rename(model, old: Sequence[str], new: Sequence[str]) -> None:
    """Rename graph values ``old`` to ``new`` everywhere in ``model`` (inputs, outputs and node references)."""
    mapping = {a: b for a, b in zip(old, new) if a != b}
    if not mapping:
        return
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                field[i] = mapping.get(name, name)


def export_onnx(model: Union[str, os.PathLike, "pb.NetParameter"], output: Union[str, os.PathLike], *,
                weights=None, opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                input_shapes: Optional[Mapping[str, Sequence[int]]] = None, check: bool = True,
                tolerance: Optional[float] = None, allow_unknown_fields: bool = False) -> ExportResult:
    """Export a slim net (prototxt path or NetParameter, with optional .caffemodel weights) to ONNX.

    The net is first brought to its deploy form (slim.deploy.make_deploy: TEST phase, data layers replaced by an
    Input layer, losses and accuracy removed), so train/val nets export as they deploy. BatchNorm uses its stored
    statistics; Dropout is the identity. The file (with any external-data files) is written whole in a temporary
    folder beside ``output``, checked there, and renamed into place only then: see the module's docstring.

    Args:
        model: the net.
        output: the .onnx file to write.
        weights: a .caffemodel (path or slim.io.CaffeModel); None exports the fillers' values.
        opset: the ONNX opset to write.
        exporter: "dynamo" (torch's default) or "legacy".
        input_shapes: per-sample input shapes, when the deploy form cannot derive them (see make_deploy).
        check: run ONNX Runtime (when installed) on random inputs at another batch size than the traced one, and
            report the largest difference from slim.
        tolerance: with the check, the largest difference relative to the largest output allowed; a file that
            differs more is not written. None accepts any.
        allow_unknown_fields: read the prototxt in tolerant mode.

    Raises:
        InteropError: an unknown exporter, an opset outside what it writes, onnx (or onnxscript for "dynamo") not
            installed, or a file that does not come out as asked (nothing is written).
        OutputError: the output folder does not exist, or is full, read-only or not writable (nothing is written).
    """
    import torch

    from slim.deploy import make_deploy
    from slim.io import read_net
    from slim.net import Net

    if exporter not in EXPORTERS:
        raise InteropError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}.")
    if not 7 <= opset <= 23:
        raise InteropError(f"opset {opset} is outside what torch's exporters write (7 to 23; 18 or later for the "
                           f"dynamo exporter).")
    if exporter == "dynamo" and opset < 18:
        raise InteropError(f"the dynamo exporter writes opset 18 or later, not {opset}; use --exporter legacy for "
                           f"older opsets.")
    onnx = require("onnx")
    if exporter == "dynamo":
        require("onnxscript")
    net_param = read_net(model, allow_unknown_fields=allow_unknown_fields) if isinstance(model, (str, os.PathLike)) \
        else model
    deploy = make_deploy(net_param, input_shapes=input_shapes, batch=1)
    net = Net(deploy, weights=weights, phase="TEST").eval()
    if not net.inputs:
        raise InteropError(f"{getattr(net_param, 'name', '') or model}: the deploy net has no inputs; nothing to "
                           f"export.")
    output = os.fspath(output)
    # Trace at batch 2: torch specialises sizes 0 and 1, so a batch of 1 would not stay dynamic.
    args = tuple(torch.randn((2,) + tuple(net.graph.shapes[name][1:])) for name in net.inputs)
    weight_bytes = sum(t.numel() * 4 for t in net.parameters())
    inputs, outputs = list(net.inputs), list(net.outputs)
    # The legacy exporter names values by TorchScript's rules, which refuse all-digit names (nets imported from
    # ONNX have them): it gets stand-ins, renamed in the file afterwards.
    stand_ins = exporter == "legacy" and any(n.isdigit() for n in [*inputs, *outputs])
    traced_in = [f"input_{i}" for i in range(len(inputs))] if stand_ins else inputs
    traced_out = [f"output_{i}" for i in range(len(outputs))] if stand_ins else outputs
    with atomic_files(output) as folder:
        # The exporters write external data beside the file they are given, under names the file refers to:
        # written under the final name in the temporary folder, the set moves into place unchanged. A str: the
        # legacy exporter writes external data only for a path given as one.
        staged = os.fspath(folder / Path(output).name)
        with _quiet_torch_onnx(), torch.no_grad():
            if exporter == "dynamo":
                torch.onnx.export(net, args, staged, dynamo=True, opset_version=opset, input_names=inputs,
                                  output_names=outputs, dynamic_shapes=net.batch_dynamic_shapes(),
                                  external_data=weight_bytes > _EXTERNAL_DATA_BYTES, verbose=False)
            else:
                torch.onnx.export(net, args, staged, dynamo=False, opset_version=opset, input_names=traced_in,
                                  output_names=traced_out,
                                  dynamic_axes={name: {0: "batch"} for name in [*traced_in, *traced_out]})
        written = onnx.load(staged, load_external_data=False)
        if stand_ins:
            _rename(written, [*traced_in, *traced_out], [*inputs, *outputs])
            onnx.save(written, staged)
        got_opset = next((e.version for e in written.opset_import if e.domain in ("", "ai.onnx")), None)
        inputs = [v.name for v in written.graph.input]
        outputs = [v.name for v in written.graph.output]
        if outputs != list(net.outputs) or got_opset != opset:
            raise InteropError(f"{output}: torch's {exporter} exporter wrote opset {got_opset} with outputs "
                               f"{outputs}; asked for opset {opset} with outputs {list(net.outputs)}. Nothing was "
                               f"written.")
        comparison = compare_with_onnxruntime(net, staged, batch=3) if check and available("onnxruntime") else None
        if comparison is not None and tolerance is not None and not comparison.max_rel <= tolerance:
            raise InteropError(f"{output} would disagree with slim by {comparison.max_rel:.3g} relative (more than "
                               f"the tolerance {tolerance:g}), so it was not written and any previous "
                               f"{Path(output).name} is unchanged; please report this with the net. Without the "
                               f"check (--no-check) the file is written unchecked.")
        data_files = sorted(os.path.join(os.path.dirname(output), name) for name in os.listdir(folder)
                            if name != Path(output).name and os.path.isfile(folder / name))
    return ExportResult(output, int(got_opset), exporter, inputs, outputs, True, comparison, data_files)

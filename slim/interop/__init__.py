"""Interop: slim nets to and from ONNX, beside slim.io (formats in, formats out).

    from slim.interop import export_onnx, import_onnx, write_imported
    export_onnx("pruned.prototxt", "pruned.onnx", weights="pruned.caffemodel")    # -> ExportResult
    write_imported(import_onnx("resnet18.onnx"), "resnet18")                     # resnet18.prototxt + .caffemodel

ONNX operators map to Caffe layer types through slim's layer registry (slim.interop.onnx_ops), so an imported
model is an ordinary slim net: trainable, prunable, exportable again. onnx, onnxruntime and onnxscript are an
optional extra (``pip install 'slim[onnx]'``); nothing outside this package imports them, and a missing one is one
InteropError that says how to install it.
"""

_LAZY = {
    "export_onnx": "slim.interop.onnx_export",
    "ExportResult": "slim.interop.onnx_export",
    "DEFAULT_OPSET": "slim.interop.onnx_export",
    "import_onnx": "slim.interop.onnx_import",
    "write_imported": "slim.interop.onnx_import",
    "load_onnx": "slim.interop.onnx_import",
    "ImportResult": "slim.interop.onnx_import",
    "compare_with_onnxruntime": "slim.interop.runtime",
    "Comparison": "slim.interop.runtime",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slim.interop' has no attribute {name!r}")

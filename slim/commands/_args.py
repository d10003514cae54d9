"""What every subcommand shares on its command line: Caffe's flag spellings, the net argument, one device
vocabulary, unknown flags with a suggestion, and help text fit for a terminal.

* Caffe's tools take ``-solver S -weights W -gpu 0`` and gflags accept ``--sighup_effect``; both are rewritten to
  slim's ``--solver``, ``--sighup-effect`` when the subcommand has that flag (``caffe_spelling``).
* The net is the same kind of argument everywhere: a positional ``NET`` or ``--model NET`` (``-m``), whichever the
  command documented first; ``add_model`` gives a command both, ``merge_model`` checks that exactly one was given.
* Devices: ``cpu``, ``cuda`` or ``gpu`` (the first GPU), ``cuda:N``, ``gpu:N`` or ``N`` (GPU N), parsed by
  ``resolve_device``, which refuses a GPU on a torch without CUDA in one sentence.
* Data: commands that read a net's data take ``--source LAYER=PATH`` (``add_source``, slim.sources), applied to the
  parsed net by ``net_with_sources``; those that only need its shapes also take ``--input-shape TOP:C,H,W``
  (``add_input_shape``, slim.offline) and say in one warning line each data layer whose data is absent (``warn``).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import List, Optional

from slim.errors import SlimError

__all__ = ["caffe_spelling", "unknown_flags", "terminal_text", "add_model", "merge_model", "resolve_device",
           "add_source", "net_with_sources", "add_input_shape", "warn", "DEVICE_HELP"]

DEVICE_HELP = "cpu, cuda (or gpu: the first GPU), cuda:N, gpu:N or N"

_SINGLE_DASH = re.compile(r"^-([A-Za-z][\w-]+)(=.*)?$")


def _long_options(parser: argparse.ArgumentParser) -> set:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


def caffe_spelling(argv: List[str], parser: argparse.ArgumentParser) -> List[str]:
    """``argv`` with Caffe's ``-flag`` and gflags' ``--flag_name`` rewritten to the subcommand's ``--flag-name``
    (only where the subcommand has that flag; everything after ``--`` is left alone)."""
    known = _long_options(parser)
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, value = arg, ""
        match = _SINGLE_DASH.match(arg)
        if match:
            name, value = "--" + match.group(1), match.group(2) or ""
        elif arg.startswith("--"):
            name, _, rest = arg.partition("=")
            value = "=" + rest if "=" in arg else ""
        candidate = name.replace("_", "-") if name.startswith("--") else name
        out.append(candidate + value if candidate in known and candidate != arg.partition("=")[0] else arg)
    return out


def unknown_flags(parser: argparse.ArgumentParser, extras: List[str]) -> str:
    """The message for arguments the subcommand does not know, with the closest flag for each."""
    known = sorted(_long_options(parser))
    pieces = []
    for arg in extras:
        name = arg.partition("=")[0]
        close = difflib.get_close_matches(name.replace("_", "-"), known, n=1, cutoff=0.6) if name.startswith("-") \
            else []
        pieces.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return f"unrecognized arguments: {', '.join(pieces)}; see {parser.prog} --help"


def terminal_text(text: Optional[str]) -> Optional[str]:
    """Help text without reStructuredText markup (the docstrings' ``code`` spans)."""
    return None if text is None else text.replace("``", "")


def add_model(parser: argparse.ArgumentParser, help: str) -> None:
    """The net as a positional NET or as ``--model NET`` / ``-m NET`` (one of them; ``merge_model`` checks)."""
    parser.add_argument("model", nargs="?", metavar="NET", help=f"{help} (or --model NET)")
    parser.add_argument("--model", "-m", dest="model_option", metavar="NET", help=argparse.SUPPRESS)
    parser.set_defaults(_merge_model=True)


def merge_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fold ``--model`` into ``args.model``; a parser error names the flag when the net is missing or given twice."""
    if not getattr(args, "_merge_model", False):
        return
    option = getattr(args, "model_option", None)
    if option is not None and args.model is not None and option != args.model:
        parser.error(f"the net was given twice ({args.model} and --model {option}); give it once")
    args.model = args.model if args.model is not None else option
    if args.model is None:
        parser.error("the net is required: give its prototxt as NET or --model NET")


def resolve_device(text: Optional[str], flag: str = "--device", default: str = "cpu"):
    """A torch.device from slim's device vocabulary (see the module docstring).

    Raises:
        SlimError: an unknown spelling, or a GPU asked of a torch without CUDA or with fewer GPUs.
    """
    import torch

    spec = (default if text is None else str(text)).strip().lower()
    match = re.fullmatch(r"(?:(cuda|gpu)(?::(\d+))?|(\d+)|(cpu))", spec)
    if not match:
        raise SlimError(f"{flag} {text} is not a device; use {DEVICE_HELP}.")
    if match.group(4):
        return torch.device("cpu")
    index = int(match.group(2) or match.group(3) or 0)
    if not torch.cuda.is_available():
        raise SlimError(f"{flag} {text} asks for a GPU, but this torch ({torch.__version__}) has no CUDA device; run "
                        f"on the CPU ({flag} cpu, or leave it out) or install a CUDA build of torch.")
    count = torch.cuda.device_count()
    if index >= count:
        raise SlimError(f"{flag} {text} asks for GPU {index}, but this machine has {count} (ids 0 to {count - 1}).")
    return torch.device(f"cuda:{index}")


def add_source(parser: argparse.ArgumentParser) -> None:
    """``--source LAYER=PATH`` (repeatable): where a data layer reads from, instead of its prototxt's source."""
    parser.add_argument("--source", action="append", default=[], metavar="LAYER=PATH",
                        help="read data layer LAYER from PATH instead of the source its prototxt names (repeatable; "
                             "LAYER@TRAIN=PATH or LAYER@TEST=PATH picks one of a TRAIN and a TEST layer that share "
                             "the name)")


def net_with_sources(path: str, sources: List[str], *, phase: str, level: int = 0, stages=(),
                     allow_unknown_fields: bool = False):
    """``path`` itself without ``--source`` flags; with them, the NetGraph of the net whose data layers read the
    given sources (slim.sources), named after ``path`` in messages. Either is what slim.Net takes.

    Raises:
        SlimError: the net cannot be read or built, or a ``--source`` flag names no data layer of it.
    """
    if not sources:
        return path
    from slim.graph import build_graph
    from slim.io import read_net
    from slim.sources import override_sources

    net = override_sources(read_net(path, allow_unknown_fields=allow_unknown_fields), sources, where=path)
    return build_graph(net, phase, level=level, stages=stages, source=path)


def add_input_shape(parser: argparse.ArgumentParser) -> None:
    """``--input-shape TOP:C,H,W`` (repeatable): a data top's per-sample shape, for data not on this machine."""
    parser.add_argument("--input-shape", action="append", default=[], metavar="TOP:C,H,W",
                        help="per-sample shape of data top TOP (e.g. data:3,224,224), used instead of reading the "
                             "data layer's data (needed where its data is absent and the prototxt does not state the "
                             "image size; repeatable)")


def warn(command: str, notes) -> None:
    """Print each note once, as one line ``slim COMMAND: warning: ...`` on stderr."""
    for note in dict.fromkeys(str(n) for n in notes):
        print(f"slim {command}: warning: {note}", file=sys.stderr)

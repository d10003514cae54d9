"""The ``slim`` command: Caffe's tools (train, test, time) and slim's (prune, calflop, deploy, zoo, demo, ...).

Each subcommand lives in slim/commands/<name>.py and provides ``register(subparsers)`` (adding its parser, with
``func`` set to its ``run(args) -> int``). This module only dispatches: user errors (SlimError) print one clear
message and exit with status 2, never a traceback. Caffe's spellings of flags (``-solver``, ``--sighup_effect``) are
accepted, an unknown flag is reported by its subcommand with the closest known one, and every subcommand's help has
a description (slim.commands._args).
"""

import argparse
import importlib
import os
import sys
import warnings
from typing import Optional

from slim import __version__
from slim.commands._args import caffe_spelling, merge_model, terminal_text, unknown_flags
from slim.errors import SlimError
from slim.threads import ENV, choose_threads, use_threads

__all__ = ["main", "COMMANDS"]

COMMANDS = ["train", "test", "time", "prune", "decompose", "pipeline", "calflop", "deploy", "zoo", "summary", "demo",
            "convert_mnist_data", "convert_imageset", "compute_image_mean", "export", "import"]

# Commands that run nets with torch: they take --threads, and the thread count chosen is applied before they run.
THREADED = ("train", "test", "time", "pipeline", "calflop", "demo")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser with every available subcommand, or with ``command`` alone.

    Registering a command imports its module and the library it runs (slim.data, slim.net, torch, ...), so a run
    of one command registers that command only: ``slim prune`` starts without loading what training needs.
    """
    parser = argparse.ArgumentParser(prog="slim", description=terminal_text(__doc__.split("\n\n")[0]))
    parser.add_argument("--version", action="version", version=f"slim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS if command is None else [command]:
        try:
            module = importlib.import_module(f"slim.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"slim.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    for name, command_parser in sub.choices.items():
        if name in THREADED:
            command_parser.add_argument("--threads", type=int, metavar="N",
                                        help=f"torch CPU threads per process (default: chosen from the cores free "
                                             f"to this process, or ${ENV}; see slim.threads)")
        if not command_parser.description:
            command_parser.description = next((a.help for a in sub._choices_actions if a.dest == name), None)
        command_parser.description = terminal_text(command_parser.description)
        for action in command_parser._actions:
            action.help = terminal_text(action.help)
    return parser


def _command_parser(parser: argparse.ArgumentParser, name: Optional[str]) -> Optional[argparse.ArgumentParser]:
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return sub.choices.get(name) if sub is not None and name is not None else None


def main(argv=None) -> int:
    """Entry point of the ``slim`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argv[0] if argv else None
    parser = build_parser(first if first in COMMANDS else None)
    command_parser = _command_parser(parser, first)
    if command_parser is not None:
        argv = [first] + caffe_spelling(argv[1:], command_parser)
    args, extras = parser.parse_known_args(argv)
    if extras:
        (command_parser or parser).error(unknown_flags(command_parser or parser, extras))
    merge_model(args, command_parser or parser)
    shown = warnings.showwarning
    warnings.showwarning = _slim_warnings_as_lines(args.command, shown)
    try:
        if args.command in THREADED and not (args.command == "calflop" and not args.measure):
            # Applied before the command imports torch; commands that log (train, test, pipeline, demo) log it.
            args.threads_choice = use_threads(choose_threads(args.threads, getattr(args, "procs", None) or 1))
        return int(args.func(args) or 0)
    except SlimError as e:
        if not getattr(e, "reported_elsewhere", False):  # e.g. a peer training process that reports it itself
            print(f"slim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"slim {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def _slim_warnings_as_lines(command: str, default):
    """A warnings.showwarning that prints slim's own warnings as ``slim COMMAND: warning: ...`` (no source line, as
    its errors); other libraries' warnings keep Python's form."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def show(message, category, filename, lineno, file=None, line=None):
        if not os.path.abspath(filename).startswith(package):
            return default(message, category, filename, lineno, file, line)
        print(f"slim {command}: warning: {message}", file=file or sys.stderr)
    return show


if __name__ == "__main__":
    sys.exit(main())

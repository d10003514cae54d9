"""The calibration flags shared by ``slim prune --criterion lasso`` and ``slim decompose``: which images, how many
output positions per image, the seed and the device, read into one slim.prune.calibrate.Calibration."""

from __future__ import annotations

import argparse

from slim.commands._args import DEVICE_HELP, resolve_device

__all__ = ["add_calibration_args", "calibration_from_args"]


def add_calibration_args(parser: argparse.ArgumentParser, title: str, sampled_at: str,
                         rank_tol: bool = False) -> None:
    """Add the calibration group: --calib-images, --samples-per-image, --calib-net, --calib-seed, --device, --source
    (and --rank-tol, LASSO's only).

    Args:
        title: the group's heading in --help.
        sampled_at: where the output positions are sampled, for the help ("each convolution").
        rank_tol: add --rank-tol.
    """
    cal = parser.add_argument_group(title)
    cal.add_argument("--calib-images", type=int, default=5000, metavar="N",
                     help="calibration images read from the net's TRAIN-phase data layer (default 5000, as the paper)")
    cal.add_argument("--samples-per-image", type=int, default=10, metavar="K",
                     help=f"output positions sampled per image at {sampled_at} (default 10)")
    cal.add_argument("--calib-net", metavar="NET",
                     help="a train/val prototxt whose TRAIN-phase data layer supplies the images (needed for a deploy "
                          "net, which has no data layer)")
    cal.add_argument("--calib-seed", type=int, default=0, help="seed of the image order, transforms and positions")
    if rank_tol:
        cal.add_argument("--rank-tol", type=float, metavar="T",
                         help="keep any count in [c', c'(1+T)] as the released code did (0.1); default: exactly c'")
    cal.add_argument("--device", default="cpu", help=f"where the calibration runs: {DEVICE_HELP} (default cpu)")
    cal.add_argument("--source", action="append", default=[], metavar="LAYER=PATH",
                     help="read the calibration net's data layer LAYER from PATH instead of the source its prototxt "
                          "names (repeatable; LAYER@TRAIN=PATH picks the TRAIN one of two layers that share the "
                          "name); the written net keeps its own source")


def calibration_from_args(args: argparse.Namespace):
    """The checked Calibration the flags describe (the device resolved against this torch build)."""
    from slim.prune.calibrate import Calibration

    calibration = Calibration(images=args.calib_images, samples_per_image=args.samples_per_image,
                              seed=args.calib_seed, net=args.calib_net, rank_tol=getattr(args, "rank_tol", None),
                              device=str(resolve_device(args.device)), sources=tuple(args.source))
    calibration.check()
    return calibration

"""Channel pruning from the graph: groups, importance, plans, rewrite and transplant (network slimming, Liu et al.
2017; channel pruning, He et al. 2017), for any net slim can build, with no per-architecture script.

    from slim.prune import PrunePolicy, prune_net, write_pruned
    result = prune_net("nets/resnet56_cifar10.prototxt", "sparse_iter_64000.caffemodel", PrunePolicy(percent=0.5))
    write_pruned(result, "pruned")               # pruned.prototxt, pruned.caffemodel, pruned.json
    print(result.report)

The pruned net equals the original with the removed channels silenced (``result.masked_original()``), to float
rounding; see slim.prune.groups for when a channel may not be removed, and why.
"""

from slim.prune.core import PruneResult, conv_fc_macs, load_blobs, output_paths, prune_net, write_pruned
from slim.prune.groups import BlobSlot, ChannelAnalysis, ChannelGroup, GroupSlot, ProducerInfo, analyze
from slim.prune.importance import ChannelScores, channel_scores, criteria, criterion, register_criterion
from slim.prune.plan import PrunePlan, PrunePolicy, make_plan, plan_from_kept
from slim.prune.report import LayerChange, PruneReport
from slim.prune.rewrite import PrunedBlobs, masked_blobs, rewrite_net, transplant


def __getattr__(name):
    # The reconstruction stage runs nets (torch); everything above is numpy-only, so it is imported on first use.
    if name in ("Calibration", "reconstruct_prune"):
        from slim.prune import calibrate, reconstruct
        return getattr(calibrate, name, None) or getattr(reconstruct, name)
    raise AttributeError(f"module 'slim.prune' has no attribute {name!r}")


__all__ = [
    "prune_net", "write_pruned", "PruneResult", "load_blobs", "conv_fc_macs", "output_paths",
    "analyze", "ChannelAnalysis", "ChannelGroup", "BlobSlot", "GroupSlot", "ProducerInfo",
    "register_criterion", "criterion", "criteria", "channel_scores", "ChannelScores",
    "PrunePolicy", "PrunePlan", "make_plan", "plan_from_kept",
    "PruneReport", "LayerChange",
    "rewrite_net", "transplant", "PrunedBlobs", "masked_blobs",
    "Calibration", "reconstruct_prune",
]

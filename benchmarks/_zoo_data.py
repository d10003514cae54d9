"""Shared by the training benchmarks: a zoo net with its dataset layers swapped for an in-memory source, so that
no data reading is timed."""

from typing import Callable

from slim import proto as pb


def replace_train_data(net: "pb.NetParameter", make: Callable[["pb.LayerParameter"], "pb.LayerParameter"]) -> None:
    """In place: drop the TEST-phase SlimData layers and replace each other SlimData layer by ``make(layer)``."""
    kept = []
    for layer in net.layer:
        if layer.type == "SlimData":
            if layer.include and layer.include[0].phase == pb.TEST:
                continue
            layer = make(layer)
        kept.append(layer)
    del net.layer[:]
    net.layer.extend(kept)

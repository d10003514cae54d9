"""Tiny nets and solvers shared by the solver tests (not a test module)."""

from pathlib import Path

from slim.io import parse_solver


def tiny_net(batch=16, channels=6, bn=True, dropout=0.0, crop=0, mirror=False, shuffle=True, test_batch=60):
    """A conv(-BN-Scale)-ReLU(-Dropout)-IP net on the built-in 8x8 digits; an Accuracy in the TEST phase."""
    aug = (f"crop_size: {crop} " if crop else "") + ("mirror: true " if mirror else "")
    norm = f"""
layer {{ name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param {{ moving_average_fraction: 0.9 }} }}
layer {{ name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param {{ bias_term: true }} }}""" if bn else ""
    drop = f"""
layer {{ name: "drop" type: "Dropout" bottom: "conv" top: "conv" dropout_param {{ dropout_ratio: {dropout} }} }}""" \
        if dropout else ""
    return f"""name: "tiny"
layer {{ name: "data" type: "SlimData" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.0625 {aug}}}
  slim_data_param {{ dataset: DIGITS batch_size: {batch} train: true shuffle: {str(shuffle).lower()} }} }}
layer {{ name: "data" type: "SlimData" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.0625 {f"crop_size: {crop}" if crop else ""} }}
  slim_data_param {{ dataset: DIGITS batch_size: {test_batch} train: false shuffle: false }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: {channels} kernel_size: 3 bias_term: {str(not bn).lower()}
                       weight_filler {{ type: "msra" }} }} }}{norm}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}{drop}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include {{ phase: TEST }} }}
"""


def write_solver(folder: Path, net_text: str, name="solver", **fields) -> Path:
    """Write net.prototxt and a solver (SGD, fixed rate, no tests, no snapshots unless ``fields`` say so)."""
    net = folder / f"{name}_net.prototxt"
    net.write_text(net_text)
    values = dict(net=str(net), base_lr=0.1, lr_policy="fixed", momentum=0.9, weight_decay=1e-3, max_iter=10,
                  display=0, snapshot_after_train=False, snapshot_prefix=str(folder / name), random_seed=3)
    values.update(fields)
    lines = []
    for key, value in values.items():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, bool):
                lines.append(f"{key}: {str(v).lower()}")
            elif isinstance(v, str) and not v.startswith("{"):
                lines.append(f'{key}: "{v}"')
            else:
                lines.append(f"{key}: {v}" if not isinstance(v, str) else f"{key} {v}")
    path = folder / f"{name}.prototxt"
    path.write_text("\n".join(lines) + "\n")
    parse_solver(path.read_text(), str(path))  # fail here, not in the test, on a typo
    return path

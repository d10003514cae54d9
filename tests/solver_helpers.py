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


def lmdb_tiny_net(folder: Path, batch=16, test_batch=60):
    """tiny_net with Caffe Data layers, TRAIN and TEST both named "data", whose prototxt sources do not exist here,
    and LMDBs of the digits (made in ``folder``) to point them at with ``--source``.

    Returns:
        (net text, train LMDB path, test LMDB path).
    """
    import numpy as np

    from slim.data.digits import load_digits
    from slim.data.lmdb_writer import write_datum_lmdb

    dbs = []
    for split, train, n in (("train", True, 96), ("test", False, 60)):
        images, labels = load_digits(train).read(np.arange(n))
        dbs.append(write_datum_lmdb(folder / f"digits_{split}_lmdb", images, labels))
    data = "\n".join(
        f'layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: {phase} }}\n'
        f'  transform_param {{ scale: 0.0625 }}\n'
        f'  data_param {{ source: "examples/digits/{split}_lmdb" batch_size: {size} backend: LMDB }} }}'
        for phase, split, size in (("TRAIN", "train", batch), ("TEST", "test", test_batch)))
    rest = tiny_net(batch, test_batch=test_batch)
    return 'name: "tiny"\n' + data + "\n" + rest[rest.index('layer { name: "conv"'):], str(dbs[0]), str(dbs[1])

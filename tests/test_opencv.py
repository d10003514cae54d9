"""OpenCV 4.x dnn as an independent Caffe oracle (REFERENCE §5).

Each deploy net below is built with slim.Net (TEST phase) with random, non-trivial blobs, saved as a .caffemodel by
``net.save``, written as a prototxt, loaded by ``cv2.dnn.readNetFromCaffe`` and run on the same input; every net
output must agree. Together the nets cover every layer type OpenCV's Caffe importer supports. They respect OpenCV's
quirks:

* no ``round_mode`` (OpenCV's proto has ``ceil_mode`` at that field number);
* LRN with k = 1 (OpenCV ignores k);
* no ``use_global_stats: false`` (OpenCV refuses it);
* scalar blobs written without a shape (``net.save`` omits it; an empty ``shape {}`` crashes OpenCV);
* Log with its default base, scale and shift: measured here, OpenCV 4.14 ignores log_param and computes log(x);
* InnerProduct ``transpose``: measured here, OpenCV 4.14's CPU path ignores the flag and reads the K x N weight as
  N x K, so the transposed layer is checked against the equivalent plain layer given the transposed weight.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from slim.io import parse_net, write_caffemodel
from slim.net import Net

cv2 = pytest.importorskip("cv2")
if not hasattr(cv2.dnn, "readNetFromCaffe"):
    pytest.skip("this OpenCV has no Caffe importer (removed in 5.x); install opencv-python-headless<5",
                allow_module_level=True)

TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"

CONVS = """
name: "convs"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 2 dilation: 2 group: 2 } }
layer { name: "bn1" type: "BatchNorm" bottom: "c1" top: "c1" batch_norm_param { use_global_stats: true } }
layer { name: "sc1" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "c1" top: "c1" relu_param { negative_slope: 0.1 } }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
        convolution_param { num_output: 4 bias_term: false kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1
                            pad_h: 1 pad_w: 0 } }
layer { name: "bn2" type: "BatchNorm" bottom: "c2" top: "c2" }
layer { name: "sc2" type: "Scale" bottom: "c2" top: "c2" }
layer { name: "prelu2" type: "PReLU" bottom: "c2" top: "c2" }
layer { name: "pmax" type: "Pooling" bottom: "c2" top: "pmax"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pave" type: "Pooling" bottom: "c2" top: "pave"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pceil" type: "Pooling" bottom: "c2" top: "pceil" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "pceil_max" type: "Pooling" bottom: "c2" top: "pceil_max"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "glob" type: "Pooling" bottom: "c2" top: "glob" pooling_param { pool: AVE global_pooling: true } }
layer { name: "globmax" type: "Pooling" bottom: "c2" top: "globmax" pooling_param { pool: MAX global_pooling: true } }
layer { name: "up" type: "Deconvolution" bottom: "pmax" top: "up"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "up2" type: "Deconvolution" bottom: "pave" top: "up2"
        convolution_param { num_output: 3 kernel_size: 2 stride: 2 bias_term: false } }
"""

ELEMENTWISE = """
name: "elementwise"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 5 dim: 5 } } }
layer { name: "split" type: "Split" bottom: "data" top: "s1" top: "s2" top: "s3" top: "s4" }
layer { name: "sig" type: "Sigmoid" bottom: "s1" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "s2" top: "tanh" }
layer { name: "elu" type: "ELU" bottom: "s3" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "abs" type: "AbsVal" bottom: "s4" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "data" top: "bnll" }
layer { name: "pow" type: "Power" bottom: "data" top: "pow" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "exp" type: "Exp" bottom: "data" top: "exp" exp_param { base: 2 scale: 0.5 shift: 0.25 } }
layer { name: "exp_e" type: "Exp" bottom: "data" top: "exp_e" }
layer { name: "log" type: "Log" bottom: "abs" top: "log" }
layer { name: "log_e" type: "Log" bottom: "bnll" top: "log_e" }
layer { name: "swish" type: "Swish" bottom: "data" top: "swish" }
layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }
layer { name: "sum" type: "Eltwise" bottom: "sig" bottom: "tanh" bottom: "elu" top: "sum"
        eltwise_param { operation: SUM coeff: 0.5 coeff: -1 coeff: 2 } }
layer { name: "prod" type: "Eltwise" bottom: "abs" bottom: "bnll" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "pow" bottom: "exp" bottom: "relu" top: "max"
        eltwise_param { operation: MAX } }
layer { name: "drop" type: "Dropout" bottom: "swish" top: "drop" dropout_param { dropout_ratio: 0.3 } }
"""

STRUCTURE = """
name: "structure"
layer { name: "data" type: "Input" top: "data" top: "data2"
        input_param { shape { dim: 2 dim: 6 dim: 6 dim: 6 } shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "slice" type: "Slice" bottom: "data" top: "sa" top: "sb" slice_param { slice_point: 2 } }
layer { name: "cat1" type: "Concat" bottom: "sa" bottom: "data2" top: "cat1" }
layer { name: "cat2" type: "Concat" bottom: "sb" bottom: "sb" top: "cat2" concat_param { axis: 2 } }
layer { name: "crop" type: "Crop" bottom: "cat2" bottom: "data" top: "crop" crop_param { offset: 3 offset: 0 } }
layer { name: "gp" type: "Pooling" bottom: "crop" top: "gp" pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "gp" top: "flat" }
layer { name: "scale2" type: "Scale" bottom: "crop" bottom: "flat" top: "scale2" scale_param { axis: 0 } }
layer { name: "prelu_s" type: "PReLU" bottom: "scale2" top: "prelu_s" prelu_param { channel_shared: true } }
layer { name: "lrn_a" type: "LRN" bottom: "cat1" top: "lrn_a"
        lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: ACROSS_CHANNELS } }
layer { name: "lrn_w" type: "LRN" bottom: "cat1" top: "lrn_w"
        lrn_param { local_size: 3 alpha: 0.8 beta: 0.6 norm_region: WITHIN_CHANNEL } }
layer { name: "rs" type: "Reshape" bottom: "lrn_w" top: "rs" reshape_param { shape { dim: 0 dim: -1 dim: 6 } } }
layer { name: "ip_axis" type: "InnerProduct" bottom: "rs" top: "ip_axis" inner_product_param { num_output: 3 axis: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "lrn_a" top: "ip" inner_product_param { num_output: 4 } }
layer { name: "softmax" type: "Softmax" bottom: "ip" top: "softmax" }
layer { name: "scale_flat" type: "Scale" bottom: "flat" top: "scale_flat" scale_param { axis: 1 } }
layer { name: "unused" type: "TanH" bottom: "data2" top: "unused" }
layer { name: "silence" type: "Silence" bottom: "unused" }
"""


def randomise(net, seed):
    """Random, plausible blobs: weights and biases N(0, 0.5), gammas of either sign, BatchNorm statistics kept as
    Caffe's running sums (mean * s, var * s, s) with the scale factor the layer's name asks for."""
    rng = np.random.default_rng(seed)
    factors = {"bn1": 7.5, "bn2": 0.0}
    with torch.no_grad():
        for node in net.graph.layers:
            blobs = net.params.get(node.name, [])
            if node.type == "BatchNorm":
                s = factors.get(node.name, 1.0)
                c = blobs[0].shape[0]
                values = [rng.uniform(-1, 1, c) * s, rng.uniform(0.5, 2, c) * s, np.array([s])]
            elif node.type in ("Scale", "PReLU"):
                values = [rng.uniform(0.5, 1.5, b.shape) * rng.choice([-1, 1], b.shape) for b in blobs]
            else:
                values = [rng.normal(0, 0.5, b.shape) for b in blobs]
            for b, v in zip(blobs, values):
                b.copy_(torch.as_tensor(np.asarray(v), dtype=torch.float32).reshape(b.shape))


def compare_with_opencv(text, tmp_path, seed=0, prototxt_text=None):
    """Run the net in slim and in OpenCV; returns the number of outputs compared."""
    net_param = parse_net(text)
    net = Net(net_param, phase="TEST", seed=seed)
    randomise(net, seed)
    rng = np.random.default_rng(seed + 100)
    inputs = {name: rng.uniform(-2, 2, net.graph.shapes[name]).astype(np.float32) for name in net.inputs}
    ours = net(**{k: torch.from_numpy(v) for k, v in inputs.items()})

    weights, deploy = tmp_path / "x.caffemodel", tmp_path / "x.prototxt"
    net.save(weights)
    deploy.write_text(prototxt_text if prototxt_text is not None else text_format.MessageToString(net_param))
    cv_net = cv2.dnn.readNetFromCaffe(str(deploy), str(weights))
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    for name, value in inputs.items():
        cv_net.setInput(value, name)
    # OpenCV names outputs by layer: the layer that last wrote each output blob.
    layer_of = {blob: net.graph.layers[net.graph.producer[bid][0]].name
                for blob, bid in zip(net.graph.outputs, net.graph.output_ids)}
    wanted = [b for b in ours if b not in inputs]
    theirs = cv_net.forward([layer_of[b] for b in wanted])
    assert len(theirs) == len(wanted)
    for blob, got in zip(wanted, theirs):
        ref = ours[blob].detach().numpy()
        got = np.asarray(got).reshape(ref.shape)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())),
                                   err_msg=f"output {blob!r} differs from OpenCV")
    return len(wanted)


def test_convolution_pooling_batchnorm_against_opencv(tmp_path):
    assert compare_with_opencv(CONVS, tmp_path, seed=1) == 6


def test_elementwise_layers_against_opencv(tmp_path):
    assert compare_with_opencv(ELEMENTWISE, tmp_path, seed=2) == 7


def test_structure_layers_against_opencv(tmp_path):
    assert compare_with_opencv(STRUCTURE, tmp_path, seed=3) == 4


def test_inner_product_transpose_against_opencv(tmp_path):
    # Caffe's transpose: true stores the weight as K x N and computes x @ W. OpenCV 4.14's CPU InnerProduct ignores
    # the flag (measured: it reads the K x N data as N x K), so the oracle runs the equivalent plain layer with the
    # weight transposed back to N x K.
    text = """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
                inner_product_param { num_output: 4 transpose: true } }
        layer { name: "ip2" type: "InnerProduct" bottom: "data" top: "ip2"
                inner_product_param { num_output: 5 axis: 2 transpose: true bias_term: false } }
    """
    net = Net(parse_net(text), seed=0)
    randomise(net, seed=5)
    assert net.params["ip"][0].shape == (12, 4) and net.params["ip2"][0].shape == (4, 5)
    x = np.random.default_rng(6).uniform(-2, 2, (2, 3, 2, 2)).astype(np.float32)
    ours = net(data=torch.from_numpy(x))
    plain = parse_net(text.replace("transpose: true", ""))
    blobs = {name: [t.detach().numpy().T if i == 0 else t.detach().numpy() for i, t in enumerate(ts)]
             for name, ts in net.params.items()}
    write_caffemodel(tmp_path / "plain.caffemodel", plain, blobs)
    (tmp_path / "plain.prototxt").write_text(text_format.MessageToString(plain))
    cv_net = cv2.dnn.readNetFromCaffe(str(tmp_path / "plain.prototxt"), str(tmp_path / "plain.caffemodel"))
    cv_net.setInput(x)
    for name, got in zip(["ip", "ip2"], cv_net.forward(["ip", "ip2"])):
        ref = ours[name].detach().numpy()
        np.testing.assert_allclose(np.asarray(got).reshape(ref.shape), ref, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(ref).max()))


def test_real_v1_alexnet_deploy_against_opencv(tmp_path):
    path = TESTNETS / "v1__models__bvlc_alexnet__deploy.prototxt"
    if not path.exists():
        pytest.skip(f"{path} is not available")
    # BVLC's V1 AlexNet deploy file (input_dim header, V1 `layers`, group 2 convolutions, LRN, Dropout), shrunk in
    # width and batch so the test stays fast; the prototxt handed to OpenCV is the same V1 text.
    widths = {"96": "8", "256": "8", "384": "8", "4096": "16", "1000": "10"}
    text = re.sub(r"num_output: (\d+)", lambda m: f"num_output: {widths[m.group(1)]}", path.read_text())
    text = text.replace("input_dim: 10\n", "input_dim: 2\n", 1)
    assert compare_with_opencv(text, tmp_path, seed=4, prototxt_text=text) == 1


def test_opencv_dialect_loads_a_cifar_resnet_with_floor_pooling(tmp_path):
    # The zoo's CIFAR ResNets subsample their option-A shortcut with a 1x1 pooling of stride 2 and round_mode
    # FLOOR, which OpenCV's importer cannot read; `slim deploy --opencv` writes it as OpenCV's ceil_mode: false.
    from slim.io import net_to_text, read_net

    path = Path(__file__).resolve().parents[1] / "nets" / "resnet20_cifar10_deploy.prototxt"
    net_param = read_net(path)
    assert any(l.pooling_param.round_mode == 1 for l in net_param.layer if l.type == "Pooling")  # FLOOR
    text = net_to_text(net_param, opencv=True)
    assert "round_mode" not in text and "ceil_mode: false" in text
    assert parse_net(text) == net_param  # slim reads OpenCV's spelling back to the same net
    with pytest.raises(cv2.error):  # the BVLC spelling fails there
        compare_with_opencv(net_to_text(net_param), tmp_path, seed=7)
    assert compare_with_opencv(net_to_text(net_param), tmp_path, seed=7, prototxt_text=text) == 1

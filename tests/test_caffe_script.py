"""An unmodified pycaffe script runs on slim: the LeNet tutorial flow (NetSpec nets on an LMDB, a SolverParameter
written through caffe_pb2, SGDSolver stepped by hand, test nets read blob by blob), and the opt-in ``import caffe``
alias that makes it resolve to slim.caffe without shadowing a real Caffe."""

import importlib
import os
import runpy
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import slim.caffe
from slim.caffe.alias import install_alias, real_caffe, uninstall_alias
from slim.errors import SlimError
from slim.io import read_net

# pycaffe's "Solving in Python with LeNet" tutorial (examples/01-learning-lenet), scaled down to a CPU test: smaller
# batches and fewer iterations. Not a line is changed for slim: it imports caffe.
LENET_TUTORIAL = """
import numpy as np
import caffe
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2

def lenet(lmdb, batch_size):
    # our version of LeNet: a series of linear and simple nonlinear transformations
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1./255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type='xavier'))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type='xavier'))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 =   L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type='xavier'))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type='xavier'))
    n.loss =  L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()

with open('lenet_auto_train.prototxt', 'w') as f:
    f.write(str(lenet('mnist_train_lmdb', 16)))
with open('lenet_auto_test.prototxt', 'w') as f:
    f.write(str(lenet('mnist_test_lmdb', 20)))

s = caffe_pb2.SolverParameter()
s.random_seed = 0xCAFFE
s.train_net = 'lenet_auto_train.prototxt'
s.test_net.append('lenet_auto_test.prototxt')
s.test_interval = 500
s.test_iter.append(5)
s.max_iter = 10000
s.type = "SGD"
s.base_lr = 0.01
s.momentum = 0.9
s.weight_decay = 5e-4
s.lr_policy = 'inv'
s.gamma = 0.0001
s.power = 0.75
s.display = 1000
s.snapshot = 5000
s.snapshot_prefix = 'lenet'
s.solver_mode = caffe_pb2.SolverParameter.CPU
with open('lenet_auto_solver.prototxt', 'w') as f:
    f.write(str(s))

caffe.set_mode_cpu()
solver = caffe.SGDSolver('lenet_auto_solver.prototxt')

# each output is (batch size, feature dim, spatial dim)
blob_shapes = [(k, v.data.shape) for k, v in solver.net.blobs.items()]
# just print the weight sizes (we'll omit the biases)
param_shapes = [(k, v[0].data.shape) for k, v in solver.net.params.items()]

solver.net.forward()  # train net
solver.test_nets[0].forward()  # test net (there can be more than one)
first_labels = solver.net.blobs['label'].data[:8].copy()

solver.step(1)
first_filters = solver.net.params['conv1'][0].diff[:, 0].reshape(4, 5, 5, 5).transpose(0, 2, 1, 3).reshape(4*5, 5*5)

niter = 40
test_interval = 20
# losses will also be stored in the log
train_loss = np.zeros(niter)
test_acc = np.zeros(int(np.ceil(niter / test_interval)))
output = np.zeros((niter, 8, 10))

# the main solver loop
for it in range(niter):
    solver.step(1)  # SGD by Caffe

    # store the train loss
    train_loss[it] = solver.net.blobs['loss'].data

    # store the output on the first test batch
    # (start the forward pass at conv1 to avoid loading new data)
    solver.test_nets[0].forward(start='conv1')
    output[it] = solver.test_nets[0].blobs['score'].data[:8]

    # run a full test every so often
    # (Caffe can also do this for us and write to a log, but we show here
    #  how to do it directly in Python, where more complicated things are easier.)
    if it % test_interval == 0 or it == niter - 1:
        correct = 0
        for test_it in range(5):
            solver.test_nets[0].forward()
            correct += sum(solver.test_nets[0].blobs['score'].data.argmax(1)
                           == solver.test_nets[0].blobs['label'].data)
        test_acc[min(it // test_interval, len(test_acc) - 1)] = correct / 100.
"""


def digit_images(n, seed):
    """28x28 uint8 images whose class is where a bright block sits (ten places), over noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 1, 28, 28)).astype(np.uint8)
    for img, k in zip(images, labels):
        r, c = 2 + 9 * (k // 4), 1 + 7 * (k % 4)
        img[0, r:r + 6, c:c + 6] = 255
    return images, labels


@pytest.fixture
def alias():
    install_alias()
    yield
    uninstall_alias()


def test_lenet_tutorial_runs_unchanged(tmp_path, monkeypatch, alias):
    pytest.importorskip("lmdb")
    from slim.data.lmdb_writer import write_datum_lmdb

    write_datum_lmdb(tmp_path / "mnist_train_lmdb", *digit_images(400, seed=1))
    write_datum_lmdb(tmp_path / "mnist_test_lmdb", *digit_images(100, seed=2))
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "lenet.py"
    script.write_text(LENET_TUTORIAL)
    g = runpy.run_path(str(script), run_name="__main__")
    assert g["caffe"] is slim.caffe
    assert [name for name, _ in g["blob_shapes"]] == ["data", "label", "conv1", "pool1", "conv2", "pool2", "fc1",
                                                      "score", "loss"]
    assert dict(g["param_shapes"]) == {"conv1": (20, 1, 5, 5), "conv2": (50, 20, 5, 5), "fc1": (500, 800),
                                       "score": (10, 500)}
    assert set(g["first_labels"]) <= set(range(10))
    assert g["first_filters"].shape == (20, 25) and g["first_filters"].any()
    loss, acc = g["train_loss"], g["test_acc"]
    assert loss[-10:].mean() < 0.5 * loss[:5].mean()            # it learns
    assert acc[-1] >= 0.8 and acc[-1] > acc[0]                  # well above chance (0.1) on held-out data
    assert g["output"][-1].argmax(1).tolist() != [0] * 8
    assert read_net("lenet_auto_train.prototxt").layer[1].convolution_param.num_output == 20


def test_alias_maps_caffe_and_its_submodules(alias):
    caffe = importlib.import_module("caffe")
    assert caffe is slim.caffe
    assert importlib.import_module("caffe.io") is slim.caffe.io
    assert importlib.import_module("caffe.proto.caffe_pb2") is slim.caffe.proto.caffe_pb2
    assert importlib.import_module("caffe.draw") is slim.caffe.draw
    from caffe import layers as L, params as P                 # noqa: E401 - pycaffe's own import line
    assert L is slim.caffe.layers and P.Pooling.MAX == 0


def test_alias_is_opt_in_and_never_hides_a_real_caffe(tmp_path, monkeypatch):
    assert "caffe" not in sys.modules
    with pytest.raises(ImportError):
        importlib.import_module("caffe")                       # nothing resolves it until asked
    real = tmp_path / "site" / "caffe"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert real_caffe() is not None
    with pytest.raises(SlimError, match="a real Caffe is importable"):
        install_alias()
    install_alias(shadow=True)
    try:
        assert importlib.import_module("caffe") is slim.caffe
    finally:
        uninstall_alias()
    assert importlib.import_module("caffe").REAL
    del sys.modules["caffe"]


def test_python_m_slim_caffe_runs_a_script(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import sys
        import caffe
        from caffe.proto import caffe_pb2
        import helper                       # the script's folder is on sys.path, as for `python probe.py`
        print(caffe.__name__, caffe_pb2.NetParameter is caffe.proto.caffe_pb2.NetParameter, sys.argv[1:], helper.X)
    """))
    (tmp_path / "helper.py").write_text("X = 7\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, "-m", "slim.caffe", str(script), "a", "b"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["slim.caffe", "True", "['a',", "'b']", "7"]
    fake = tmp_path / "site" / "caffe"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    env["PYTHONPATH"] = str(tmp_path / "site") + os.pathsep + env["PYTHONPATH"]
    refused = subprocess.run([sys.executable, "-m", "slim.caffe", str(script)], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "a real Caffe is importable" in refused.stderr
    shadowed = subprocess.run([sys.executable, "-m", "slim.caffe", "--shadow", str(script)], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)
    assert shadowed.returncode == 0 and shadowed.stdout.startswith("slim.caffe")

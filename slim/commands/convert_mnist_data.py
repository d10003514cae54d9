"""``slim convert_mnist_data IMAGES LABELS OUTPUT``: Caffe's tool of the same name (IDX files -> LMDB of Datum).

    slim convert_mnist_data data/mnist/train-images-idx3-ubyte data/mnist/train-labels-idx1-ubyte \\
        examples/mnist/mnist_train_lmdb --backend lmdb

Caffe's examples/mnist/create_mnist.sh runs it once per split; its nets then read the databases unchanged.
Compressed (.gz) files are read as they are, without gunzip.
"""

from slim.data.lmdb_writer import convert_mnist_data


def register(sub):
    p = sub.add_parser("convert_mnist_data", help="convert MNIST-format IDX files into an LMDB of Datum records "
                       "(Caffe's convert_mnist_data)")
    p.add_argument("images", help="the idx3-ubyte image file (raw or .gz)")
    p.add_argument("labels", help="the idx1-ubyte label file (raw or .gz)")
    p.add_argument("output", help="the LMDB folder to create (must not exist)")
    p.add_argument("--backend", "-backend", default="lmdb", help="the database type: lmdb (Caffe's default for "
                   "this tool; LEVELDB is not supported)")
    p.set_defaults(func=run)


def run(args) -> int:
    convert_mnist_data(args.images, args.labels, args.output, backend=args.backend, echo=print)
    return 0

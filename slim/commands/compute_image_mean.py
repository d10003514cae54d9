"""``slim compute_image_mean INPUT_DB [OUTPUT_FILE]``: Caffe's tool of the same name (the mean image of an LMDB of
Datum records, written as a .binaryproto BlobProto that transform_param.mean_file reads).

    slim compute_image_mean examples/cifar10/cifar10_train_lmdb examples/cifar10/mean.binaryproto

Without OUTPUT_FILE the mean is only computed and its per-channel values logged; see slim.data.mean.
"""

from slim.data.mean import compute_image_mean


def register(sub):
    p = sub.add_parser("compute_image_mean", help="compute the mean image of an LMDB of Datum records as a "
                       ".binaryproto mean file (Caffe's compute_image_mean)",
                       description="Compute the mean image of INPUT_DB (an LMDB of Datum records; encoded records "
                                   "are decoded) as Caffe's compute_image_mean does: write it to OUTPUT_FILE as a "
                                   "1 x C x H x W BlobProto for transform_param mean_file, and print each channel's "
                                   "mean (the values for mean_value).")
    p.add_argument("input_db", metavar="INPUT_DB", help="the LMDB folder of Datum records")
    p.add_argument("output_file", metavar="OUTPUT_FILE", nargs="?",
                   help="the .binaryproto to write (default: only print the per-channel means)")
    p.add_argument("--backend", default="lmdb", help="the database type: lmdb (Caffe's default for this tool; "
                                                     "LEVELDB is not supported)")
    p.set_defaults(func=run)


def run(args) -> int:
    compute_image_mean(args.input_db, args.output_file, backend=args.backend, echo=print)
    return 0

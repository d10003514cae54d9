"""``slim convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME``: Caffe's tool of the same name (a list of images
-> LMDB of Datum records, BGR as Caffe stores them).

    slim convert_imageset --resize_height 256 --resize_width 256 --shuffle data/train/ train.txt train_lmdb

Caffe's spellings work (``-gray -shuffle``, ``--resize_height=256``); see slim.data.imageset for every rule.
"""

from slim.data.imageset import convert_imageset


def register(sub):
    p = sub.add_parser("convert_imageset", help="convert a list of images (path label lines) into an LMDB of Datum "
                       "records (Caffe's convert_imageset)",
                       description="Convert the images of LISTFILE (one 'relative/path.jpg label' line each) into an "
                                   "LMDB of Datum records, as Caffe's convert_imageset: keys %08d_ + path, colour "
                                   "pixels in BGR order. Images that cannot be read are skipped with a message. "
                                   "Needs Pillow and lmdb (pip install slim[image,lmdb]).")
    p.add_argument("root_folder", metavar="ROOTFOLDER/", help="the folder the list's paths are relative to")
    p.add_argument("list_file", metavar="LISTFILE", help="text file of 'path label' lines (label after the last "
                                                         "space)")
    p.add_argument("output", metavar="DB_NAME", help="the LMDB folder to create (must not exist)")
    p.add_argument("--gray", action="store_true", help="decode the images as one grey channel (default: 3 "
                                                       "channels, BGR)")
    p.add_argument("--shuffle", action="store_true", help="write the images in a random order (seeded: --seed)")
    p.add_argument("--seed", type=int, default=0, help="the seed of --shuffle (default 0; Caffe's shuffle is "
                                                       "unseeded)")
    p.add_argument("--backend", default="lmdb", help="the database type: lmdb (Caffe's default for this tool; "
                                                     "LEVELDB is not supported)")
    p.add_argument("--resize-width", type=int, default=0, metavar="W", help="resize every image to this width "
                                                                           "(with --resize-height)")
    p.add_argument("--resize-height", type=int, default=0, metavar="H", help="resize every image to this height "
                                                                            "(with --resize-width)")
    p.add_argument("--check-size", action="store_true", help="stop when an image's size differs from the first "
                                                             "one's")
    p.add_argument("--encoded", action="store_true", help="store image files (the original file where it fits) "
                                                          "instead of raw pixels")
    p.add_argument("--encode-type", default="", metavar="TYPE", help="the file type of encoded records: png, jpg, "
                                                                     "... (implies --encoded; default: each file's "
                                                                     "own)")
    p.set_defaults(func=run)


def run(args) -> int:
    convert_imageset(args.root_folder, args.list_file, args.output, gray=args.gray, shuffle=args.shuffle,
                     seed=args.seed, backend=args.backend, resize_height=args.resize_height,
                     resize_width=args.resize_width, check_size=args.check_size, encoded=args.encoded,
                     encode_type=args.encode_type, echo=print)
    return 0

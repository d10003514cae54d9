#!/usr/bin/env python3
"""Regenerate slim/proto/slim.desc from proto/slim.proto (needs grpcio-tools: pip install -e .[dev]).

    python tools/gen_proto.py            # rewrite slim/proto/slim.desc
    python tools/gen_proto.py --check    # exit 1 if slim.desc is stale

The output is a FileDescriptorSet without source info, so it depends only on the schema, not on comments.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "slim.proto"
DESC = ROOT / "slim" / "proto" / "slim.desc"


def compile_descriptor() -> bytes:
    """Run protoc (from grpcio-tools) on proto/slim.proto and return the serialized FileDescriptorSet."""
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit("tools/gen_proto.py needs grpcio-tools: pip install grpcio-tools (or pip install -e .[dev])")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slim.desc"
        rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", str(PROTO)])
        if rc != 0:
            sys.exit(f"protoc failed on {PROTO} with status {rc}")
        return out.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that slim.desc is up to date")
    args = parser.parse_args()
    fresh = compile_descriptor()
    if args.check:
        if DESC.read_bytes() != fresh:
            print(f"{DESC} is stale: run python tools/gen_proto.py", file=sys.stderr)
            return 1
        print(f"{DESC} is up to date")
        return 0
    DESC.write_bytes(fresh)
    print(f"wrote {DESC} ({len(fresh)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

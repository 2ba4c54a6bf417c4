"""`jaxground export --checkpoint DIR --out DIR`: a converted checkpoint -> PyTorch safetensors under the torch
key names it came from (the released NExT-Chat layout for NExT-Chat models, else the source's own layout)."""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a `jaxground convert` output directory")
    parser.add_argument("--out", required=True, help="directory for the safetensors file(s)")
    parser.add_argument("--shard-gib", type=float, default=2.0, help="maximum size of one safetensors shard")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the weight files of an earlier export in --out (other files stay)")


def run(args) -> int:
    from jaxground.convert.export import export

    def progress(done: int, total: int) -> None:
        print(f"  {done}/{total} tensors", file=sys.stderr, flush=True)

    if args.shard_gib <= 0:
        print(f"jaxground export: --shard-gib must be > 0, got {args.shard_gib}", file=sys.stderr)
        return 2
    try:
        files = export(args.checkpoint, args.out, shard_bytes=int(args.shard_gib * 2**30), progress=progress,
                       overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"jaxground export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} file(s) to {args.out}")
    return 0

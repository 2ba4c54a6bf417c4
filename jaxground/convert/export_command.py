"""`jaxground export --checkpoint DIR --out DIR [--tokenizer DIR]`: a `jaxground convert` output or a `jaxground
train` checkpoint -> PyTorch safetensors under torch key names (the released NExT-Chat layout for NExT-Chat models,
else the source's own layout); for NExT-Chat also the config.json and tokenizer the official code loads."""

from __future__ import annotations

import math
import sys

from jaxground.paths import unwritable_dir


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a `jaxground convert` output, or a training run's "
                        "workdir, checkpoint directory or step directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory copied beside a NExT-Chat model "
                        "(default for a training checkpoint: its run config's)")
    parser.add_argument("--out", required=True, help="directory for the safetensors file(s)")
    parser.add_argument("--shard-gib", type=float, default=2.0, help="maximum size of one safetensors shard")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an earlier export in --out (other files stay)")


def run(args) -> int:
    from jaxground.convert.export import export

    def progress(done: int, total: int) -> None:
        print(f"  {done}/{total} tensors", file=sys.stderr, flush=True)

    if not (0 < args.shard_gib < math.inf):  # also refuses nan
        print(f"jaxground export: --shard-gib must be a finite number > 0, got {args.shard_gib}", file=sys.stderr)
        return 2
    if problem := unwritable_dir(args.out):
        print(f"jaxground export: --out: {problem}", file=sys.stderr)
        return 2
    try:
        files = export(args.checkpoint, args.out, tokenizer=args.tokenizer, shard_bytes=int(args.shard_gib * 2**30),
                       progress=progress, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"jaxground export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} weight file(s) to {args.out}")
    return 0

"""`jaxground data shapes --out DIR`: write the synthetic shapes data set (train/val/test ArrayRecord files and
its BPE tokenizer). `jaxground data inspect FILE`: count the records of an ArrayRecord file and print some."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jaxground.paths import unwritable_dir

# what `data shapes` writes into --out
DATA_SET = {"train.array_record", "val.array_record", "test.array_record", "tokenizer"}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    s = sub.add_parser("shapes", help="generate the synthetic shapes data set")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--train", type=int, default=20000)
    s.add_argument("--val", type=int, default=1000)
    s.add_argument("--test", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-objects", type=int, default=1)
    s.add_argument("--max-objects", type=int, default=6, help="curriculum: at most this many shapes per image")
    s.add_argument("--workers", type=int, default=0, help="processes drawing images (0 = this one)")
    s.add_argument("--overwrite", action="store_true", help="replace the data set already in --out")
    i = sub.add_parser("inspect", help="count and print records of an ArrayRecord file")
    i.add_argument("file")
    i.add_argument("-n", type=int, default=3, help="records to print")


def run(args) -> int:
    try:
        return _shapes(args) if args.action == "shapes" else _inspect(args)
    except (OSError, ValueError) as e:  # an output that cannot be written; a record file not there or unreadable
        print(f"jaxground data {args.action}: {e}", file=sys.stderr)
        return 2


def _shapes(args) -> int:
    from jaxground.data.shapes import write_dataset

    problems = [f"--{k} must be >= 0, got {getattr(args, k)}" for k in ("train", "val", "test") if getattr(args, k) < 0]
    if not 1 <= args.min_objects <= args.max_objects <= 12:
        problems.append(f"need 1 <= --min-objects <= --max-objects <= 12, got {args.min_objects} and "
                        f"{args.max_objects}")
    if args.image_size < 16 or args.workers < 0:
        problems.append(f"need --image-size >= 16 and --workers >= 0, got {args.image_size} and {args.workers}")
    if problem := unwritable_dir(args.out):
        problems.append(f"--out: {problem}")
    elif not args.overwrite and (held := sorted(n for n in DATA_SET if (Path(args.out) / n).exists())):
        problems.append(f"--out {args.out} already holds a data set ({', '.join(held)}); pass --overwrite to replace it")
    if problems:
        print(f"jaxground data shapes: {'; '.join(problems)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    counts = write_dataset(args.out, train=args.train, val=args.val, test=args.test, size=args.image_size,
                           seed=args.seed, min_objects=args.min_objects, max_objects=args.max_objects,
                           workers=args.workers)
    print(f"wrote {counts} to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _inspect(args) -> int:
    from jaxground.data.records import RecordSource

    src = RecordSource(args.file)
    print(f"{args.file}: {len(src)} records")
    for k in range(min(args.n, len(src))):
        ex = src[k]
        print(json.dumps({"key": ex.key, "size": [ex.width, ex.height], "names": ex.names,
                          "boxes": ex.boxes.tolist(), "tasks": ex.tasks})[:2000])
    return 0

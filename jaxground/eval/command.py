"""`jaxground eval --config CFG --checkpoint DIR [--out DIR] [key=value ...]`

REC evaluation as the authors run it: every sample of `config.eval.datasets` is answered "<at> <boxes>" with
one teacher-forced forward pass; Acc@0.5 and mean IoU of F(t) against the ground truth. The last batch is
padded (`valid=False` rows), so no sample is dropped or counted twice. Writes OUT/eval.json (metrics) and
OUT/predictions.jsonl (one line per sample). Exit status 2 for a bad config or checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="the run's configs/*.py")
    parser.add_argument("--checkpoint", required=True, help="a run's workdir, checkpoint dir or step dir")
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint path)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def run(args) -> int:
    from flax import nnx

    from jaxground.config import ConfigError, load_config
    from jaxground.data.pipeline import make_pipeline
    from jaxground.eval.runners import rec_teacher_forced_step, run_rec
    from jaxground.infer.command import load_model
    from jaxground.train.task import data_config

    try:
        config = load_config(args.config, args.overrides)
        model, _ = load_model(config, args.checkpoint)
        batches = make_pipeline(data_config(config, training=False), training=False)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"jaxground eval: {e}", file=sys.stderr)
        return 2
    step = nnx.jit(rec_teacher_forced_step)
    summary, rows = run_rec(lambda b: step(model, b), batches)
    out = Path(args.out or args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"rec": summary}, indent=2))
    with open(out / "predictions.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(json.dumps({"rec": summary}))
    return 0

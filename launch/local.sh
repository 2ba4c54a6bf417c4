#!/usr/bin/env bash
# The README's run command: sets up .venv, generates the synthetic shapes data (once), trains the tiny
# NExT-Chat (stage 1, then stage 3, the mask head),
# evaluates REC and mask cIoU on the held-out test split, draws a few predictions, and prints the figures. Outputs go to runs/tiny_shapes/.
# Environment: DATA (data dir, default data/shapes), RUN (output dir, default runs/tiny_shapes).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
DATA="${DATA:-data/shapes}"
RUN="${RUN:-runs/tiny_shapes}"
CONFIG=configs/tiny_shapes.py
PATHS=("data.datasets.shapes.path=$DATA" "eval.datasets.shapes.path=$DATA")
start=$(date +%s)
last=$start
lap() {  # prints the time the previous part took
  local now; now=$(date +%s); echo "[local] $1 took $((now - last)) s"; last=$now
}

# none yet, or an interrupted generation's part (the tokenizer is written last): (re)generate it
if [ ! -f "$DATA/test.array_record" ] || [ ! -d "$DATA/tokenizer" ]; then
  echo "[local] generating the synthetic shapes data in $DATA"
  jaxground data shapes --out "$DATA" --train 8000 --val 200 --test 1000 --workers 2 --overwrite
  lap "data generation"
fi

# Stage 1 on every scene from scratch (configs/tiny_shapes.py: 12,600 steps at batch 8, lr 7e-4); the patch and
# attribute aids there teach matching the expression's words to the image (README, "Figures of the embedded
# default"; docs/embedded_default_runs.md).
echo "[local] stage 1: all scenes"
jaxground train --config "$CONFIG" --workdir "$RUN/stage1" "${PATHS[@]}"
lap "stage 1"
echo "[local] stage 3: mask head on a tiny SAM, from stage 1"
jaxground train --config configs/tiny_shapes_stage3.py --workdir "$RUN/stage3" --init-from "$RUN/stage1" "${PATHS[@]}"
lap "stage 3"

echo "[local] evaluating REC on the test split"
jaxground eval --config configs/tiny_shapes_stage3.py --checkpoint "$RUN/stage3" --out "$RUN/eval" "${PATHS[@]}"
echo "[local] evaluating REC on the single-object test scenes"
jaxground eval --config configs/tiny_shapes_stage3.py --checkpoint "$RUN/stage3" --out "$RUN/eval_1object" \
  "${PATHS[@]}" eval.max_objects=1
echo "[local] drawing predictions for 3 test images into $RUN/predictions"
mkdir -p "$RUN/predictions"
python - "$DATA" "$RUN/predictions" > "$RUN/predictions/requests.tsv" <<'PY'
import sys
from pathlib import Path
from jaxground.data.records import RecordSource
src, out = RecordSource([Path(sys.argv[1]) / "test.array_record"]), Path(sys.argv[2])
for i in range(3):
    ex = src[i]
    (out / f"input{i}.png").write_bytes(ex.image)
    print(f"{out}/input{i}.png\tWhere is {ex.tasks['rec'][0]['expr']}?\t{out}/pred{i}.png")
PY
jaxground predict --config configs/tiny_shapes_stage3.py --checkpoint "$RUN/stage3" \
  --list "$RUN/predictions/requests.tsv" "${PATHS[@]}"
lap "evaluation and pictures"

echo "[local] figures on the held-out test split (teacher-forced REC after stage 1; + mask cIoU after stage 3):"
cat "$RUN/stage1/eval.json" "$RUN/stage3/eval.json"
echo "[local] REC on the single-object test scenes:"
cat "$RUN/eval_1object/eval.json"
echo "[local] done in $(( $(date +%s) - start )) s; outputs in $RUN"

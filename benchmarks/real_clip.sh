#!/usr/bin/env bash
# Issue #3 "done when": every method over all 144 real frames of ILSVRC2015_val_00007010 at full
# R-50-DC5 size (1000x600) on CPU, in one mode, through the user's path (`viddet demo`), with the
# parity checkpoints (../shared/parity/make_checkpoint.py --seed 0; single uses the DFF file's
# detector). Wall time and peak RSS come from /usr/bin/time -v; benchmarks/summarize_real_clip.py
# turns the logs into a table.
#
#   bash benchmarks/real_clip.sh offline /tmp/ckpt work_dirs/real_clip   # and again with online
set -euo pipefail
mode=${1:?mode: offline or online}
ckpt=${2:-/tmp/ckpt}
out=${3:-work_dirs/real_clip}
clip=${CLIP:-../shared/data/ILSVRC2015_val_00007010}
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for m in ${METHODS:-dff single selsa troi fgfa}; do
  ck=$m; [ "$m" = single ] && ck=dff
  /usr/bin/time -v -o "$out/${m}_${mode}.time" \
    viddet demo "$clip" --method "$m" --checkpoint "$ckpt/${ck}_r50.pth" --backbone r50 --mode "$mode" \
      --device cpu --out "$out/${m}_${mode}.mp4" --json "$out/${m}_${mode}.jsonl" \
      > "$out/${m}_${mode}.log" 2>&1
  tail -n 1 "$out/${m}_${mode}.log"
done

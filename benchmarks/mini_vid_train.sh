#!/usr/bin/env bash
# mini_vid reproduction on the CPU: train + evaluate single, SELSA, DFF and FGFA with the
# MobileNetV2-lite backbone (configs/mini_vid/*.yaml), one after the other, from the repository root.
#   bash benchmarks/mini_vid_train.sh [methods...]        (default: single selsa dff fgfa)
#   bash benchmarks/mini_vid_train.sh yolov               YOLOV on the ImageNet MobileNetV2 body
#                                                         (configs/mini_vid/yolov_mobilenetv2.yaml)
# Writes work_dirs/mini_vid_<method>/ (checkpoints, logs, eval_epoch_1/metrics.json) and appends one line
# per run to work_dirs/mini_vid_times.tsv (method, start, end, wall seconds, exit status).
set -u
cd "$(dirname "$0")/.."
if [ ! -f work_dirs/mini_vid_ann/imagenet_vid_val.json ]; then
  viddet convert imagenet-vid --root ../shared/data/mini_vid --out work_dirs/mini_vid_ann --splits train val --no-progress
fi
methods=("$@")
[ ${#methods[@]} -eq 0 ] && methods=(single selsa dff fgfa)
for m in "${methods[@]}"; do
  start=$(date -u +%FT%TZ); t0=$(date +%s)
  viddet train "configs/mini_vid/${m}_mobilenetv2.yaml" --work-dir "work_dirs/mini_vid_${m}" --device cpu --threads 1 --no-progress
  rc=$?
  t1=$(date +%s)
  printf '%s\t%s\t%s\t%s\t%s\n' "$m" "$start" "$(date -u +%FT%TZ)" "$((t1 - t0))" "$rc" >> work_dirs/mini_vid_times.tsv
done

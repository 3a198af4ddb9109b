#!/usr/bin/env bash
# The GPU speed table of benchmarks/RESULTS.md in one call on a GPU machine: `viddet benchmark` for
# every method at 1000x600 (R-50, random weights: the cost does not depend on them), fp32 and
# autocast bf16 / fp16, merged into one JSON file. Sized for one 10-minute device call: 15 runs,
# each stopped after TIMEOUT seconds (default 60; a run is ~10-20 s of start-up and model building
# plus its frames).
#
# On a machine without internet whose Python lacks PyAV or pycocotools, download their wheels for
# that machine's Python beforehand, into a folder that travels with the working tree, e.g.
#   pip download av pycocotools --no-deps --only-binary :all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .device_wheels
# (40 MB; carry that folder: it is git-ignored) and the script installs them from there
# (WHEELS=.device_wheels, the default).
#
#   OUT=/some/folder bash benchmarks/gpu_table.sh          # -> $OUT/gpu_table.json, $OUT/gpu_table.log
# Overrides for a dry run on the CPU: DEVICE=cpu SIZE=320x192 FRAMES=2 METHODS="dff" AMPS="fp32".
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-1000x600}
FRAMES=${FRAMES:-40}
METHODS=${METHODS:-"dff selsa fgfa troi single"}
AMPS=${AMPS:-"fp32 bf16 fp16"}
WHEELS=${WHEELS:-.device_wheels}
mkdir -p "$OUT"
LOG="$OUT/gpu_table.log"
PARTS=$(mktemp -d)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    if ! $PY -c "import av, pycocotools" 2>/dev/null && [ -d "$WHEELS" ]; then
        $PY -m pip install -q --no-deps --no-index --find-links "$WHEELS" av pycocotools
    fi
    $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    for m in $METHODS; do
        warm=3
        [ "$m" = fgfa ] && warm=16        # full 31-frame windows
        for amp in $AMPS; do
            extra=()
            [ "$amp" != fp32 ] && extra=(--amp "$amp")
            echo "== $m $amp"
            timeout "${TIMEOUT:-60}" $PY -m viddet benchmark --method "$m" --device "$DEVICE" --size "$SIZE" \
                --frames "$FRAMES" --warmup "$warm" "${extra[@]}" --json "$PARTS/${m}_${amp}.json" \
                || echo "FAILED: $m $amp (exit $?)"
        done
    done
    $PY - "$PARTS" "$OUT/gpu_table.json" <<'EOF'
import json, sys
from pathlib import Path
parts = sorted(Path(sys.argv[1]).glob('*.json'))
table = {p.stem: json.loads(p.read_text()) for p in parts}
Path(sys.argv[2]).write_text(json.dumps(table, indent=1))
print(f'{len(table)} results -> {sys.argv[2]}')
EOF
} 2>&1 | tee "$LOG"
rm -rf "$PARTS"

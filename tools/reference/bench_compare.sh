#!/usr/bin/env bash
# Side-by-side CPU timings: groundkit (Rust, candle) vs the PyTorch twins, on random
# weights: forwards of CLIP-B/16, its grounder and the HiVG-B/16 and QRNet (Swin-S) grounders,
# and of the released HiVG-B/16, CLIP-VG and TransVG-R50 (our transcriptions; bench_torch.py),
# and the demo grounder's forward and training step (synth_twin.py).
#
#     bash tools/reference/bench_compare.sh [THREADS=2] [MODELS]
#
# MODELS: comma-separated subset of clip-b16-vision,grounder-clip-b16,grounder-hivg-b16,
# grounder-hivg-b16-release,grounder-clipvg-b16,grounder-qrnet-swin-s,grounder-transvg-r50,
# synth-small,synth-small-train (default: all but the HiVG, CLIP-VG, QRNet and TransVG ones).
#
# Builds only `cargo build --release -p gk-cli`, then for each model x batch runs
#     RAYON_NUM_THREADS=$THREADS target/release/groundkit bench --models M --batch B --iters 5
#     .venv-ref/bin/python tools/reference/bench_torch.py --model M --threads $THREADS --batch B --iters 5
# and prints a markdown table on stdout (progress goes to stderr).
# ratio = torch ms / groundkit ms: > 1 means groundkit is faster.
set -euo pipefail

THREADS="${1:-2}"
if ! [[ "$THREADS" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash tools/reference/bench_compare.sh [THREADS=2]  (THREADS: a positive integer, got '$THREADS')" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

PY="$ROOT/.venv-ref/bin/python"
BIN="$ROOT/target/release/groundkit"
IFS=, read -r -a MODELS <<<"${2:-clip-b16-vision,grounder-clip-b16,synth-small,synth-small-train}"
BATCHES=(1 8)
ITERS=5

if [[ ! -x "$PY" ]]; then
    echo "missing $PY: run tools/reference/setup.sh first" >&2
    exit 1
fi

echo "building groundkit (release)..." >&2
cargo build --release -p gk-cli >&2
if [[ ! -x "$BIN" ]]; then
    echo "missing $BIN after the build" >&2
    exit 1
fi

# The torch process runs without the OpenBLAS tuning variables (they can slow numpy; torch
# does not use OpenBLAS for these forwards, but every torch run sees the same environment).
torch_env() {
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$@"
}

# median_ms of the last JSON line on stdin whose "model" and "batch" match.
median_of() {
    "$PY" -c '
import json, sys
model, batch = sys.argv[1], int(sys.argv[2])
hit = None
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        o = json.loads(line)
    except json.JSONDecodeError:
        continue
    if o.get("model") == model and int(o.get("batch", -1)) == batch and "median_ms" in o:
        hit = o
if hit is None:
    sys.exit(f"no JSON result for model={model} batch={batch}")
print(float(hit["median_ms"]))
' "$1" "$2"
}

echo "torch threads: $(torch_env "$PY" -c '
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
lines = [l.strip() for l in torch.__config__.parallel_info().splitlines() if "at::get_num_threads()" in l]
print(lines[0] if lines else "at::get_num_threads() : %d (parallel_info has no such line)" % torch.get_num_threads())
' "$THREADS")"

ROWS=()
for m in "${MODELS[@]}"; do
    batches=("${BATCHES[@]}")
    twin=(tools/reference/bench_torch.py)
    if [[ "$m" == synth-small* ]]; then
        batches=(1 32)   # latency of one query; the demo's training batch
        twin=(tools/reference/synth_twin.py bench)
    fi
    for b in "${batches[@]}"; do
        echo "[$m batch $b] groundkit..." >&2
        ours_out="$(RAYON_NUM_THREADS="$THREADS" "$BIN" bench --models "$m" --batch "$b" --iters "$ITERS")"
        ours="$(median_of "$m" "$b" <<<"$ours_out")"
        echo "[$m batch $b] torch..." >&2
        torch_out="$(torch_env "$PY" "${twin[@]}" --model "$m" --threads "$THREADS" --batch "$b" --iters "$ITERS")"
        theirs="$(median_of "$m" "$b" <<<"$torch_out")"
        echo "  groundkit $ours ms, torch $theirs ms" >&2
        ROWS+=("$m $b $THREADS $ours $theirs")
    done
done

printf '%s\n' "${ROWS[@]}" | "$PY" -c '
import sys
print("| model | batch | threads | groundkit ms | PyTorch ms | ratio (torch/ours) |")
print("|---|---:|---:|---:|---:|---:|")
for line in sys.stdin:
    m, b, t, ours, torch_ms = line.split()
    ours, torch_ms = float(ours), float(torch_ms)
    ratio = torch_ms / ours if ours > 0 else float("nan")
    print(f"| {m} | {b} | {t} | {ours:.1f} | {torch_ms:.1f} | {ratio:.2f} |")
'

#!/usr/bin/env bash
# The cost of distillation per training step: the demo model (configs/synth-small.toml)
# trained for STEPS steps without a teacher, with a cached teacher and with a live one.
#
#     bash tools/bench_distill.sh DATA TEACHER [STEPS=40] [THREADS=2]
#
# DATA: a `groundkit synth` folder; TEACHER: a teacher folder (`groundkit pretrain-teacher`).
# Builds `cargo build --release -p gk-cli`, writes runs under $OUT (default /tmp/bench_distill),
# and prints a markdown table: median samples/s over the logged 10-step windows after the
# first, ms per step at batch 32, and the overhead against the baseline. The cache is built
# (or found) by a separate first run whose wall time is reported too.
set -euo pipefail
DATA="$(realpath "${1:?usage: bench_distill.sh DATA TEACHER [STEPS] [THREADS]}")"
TEACHER="$(realpath "${2:?usage: bench_distill.sh DATA TEACHER [STEPS] [THREADS]}")"
STEPS="${3:-40}"
THREADS="${4:-2}"
OUT="${OUT:-/tmp/bench_distill}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build --release -p gk-cli >&2
BIN="$ROOT/target/release/groundkit"
rm -rf "$OUT" && mkdir -p "$OUT"

# variant name -> [distill] table (empty = none)
declare -A KD=(
  [baseline]=""
  [epmvg-cached]="feature = 1.0
cross = 1.0"
  [duet-cached]="duet_region = 1.0
duet_align = 1.0
duet_self = 1.0"
  [epmvg-live]="feature = 1.0
cross = 1.0
live = true"
  [duet-live]="duet_region = 1.0
duet_align = 1.0
duet_self = 1.0
live = true"
)
ORDER=(baseline epmvg-cached duet-cached epmvg-live duet-live)

config() { # name -> config file
  local f="$OUT/$1.toml"
  sed "s#demo-run/data#$DATA#g" configs/synth-small.toml >"$f"
  if [ -n "${KD[$1]}" ]; then
    printf '\n[distill]\nteacher = "%s"\n%s\n' "$TEACHER" "${KD[$1]}" >>"$f"
  fi
  echo "$f"
}

# the cache with SLA scores, built once (its cost is one-off per teacher and training set)
start=$(date +%s.%N)
RAYON_NUM_THREADS=$THREADS "$BIN" train --config "$(config duet-cached)" --out "$OUT/warm" --stop-after 1 >/dev/null 2>&1
cache_s=$(printf '%.1f' "$(echo "$(date +%s.%N) - $start" | bc)")
echo "cache build (or hit) + 1 step: ${cache_s} s" >&2

echo "| variant | samples/s | ms/step (batch 32) | overhead vs baseline |"
echo "|---|---:|---:|---:|"
base=""
for v in "${ORDER[@]}"; do
  echo "running $v" >&2
  RAYON_NUM_THREADS=$THREADS "$BIN" train --config "$(config "$v")" --out "$OUT/$v" --stop-after "$STEPS" >/dev/null 2>&1
  sps=$(python3 - "$OUT/$v/metrics.jsonl" <<'PY'
import json, statistics, sys
w = [json.loads(l)["samples_per_s"] for l in open(sys.argv[1]) if '"samples_per_s"' in l]
print(f"{statistics.median(w[1:] or w):.1f}")
PY
)
  ms=$(echo "scale=0; 32000 / $sps" | bc)
  [ -z "$base" ] && base=$sps
  over=$(python3 -c "print(f'{($base / $sps - 1) * 100:+.0f}%')")
  echo "| $v | $sps | $ms | $over |"
done
echo "cache build (first run, incl. one step): ${cache_s} s" 

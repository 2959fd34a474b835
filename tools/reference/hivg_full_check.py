#!/usr/bin/env python3
"""Full-size HiVG-B/16 and CLIP-VG-B/16 parity, end to end through the binary (not run in CI: ~2 GB of files).

    .venv-ref/bin/python tools/reference/make_hivg_fixtures.py --full /tmp/hivg_full
    cargo build --release -p gk-cli
    python3 tools/reference/hivg_full_check.py /tmp/hivg_full [target/release/groundkit] [--dry-run]

For each model of DIR/cases.json: `groundkit import hivg|clip-vg --checkpoint F --tokenizer DIR/tokenizer.json
--out RUN` under /usr/bin/time -v (peak RSS, wall time), then `groundkit predict` on every case, and the largest
|box - reference| in pixels (the reference: our transcription's box at batch 1; HiVG per_sample, CLIP-VG fp32).
For HiVG also `import hivg --bridge-mode batched` into a second run and `groundkit eval --batch 4 --json` over a
JSONL of the batched cases in their order, scored against the reference batched boxes: the mIoU should be ~100.
Ends with one summary line per model. Standard library only (any python3); --dry-run prints the commands.
"""
import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

FAMILY = {"hivg": "hivg", "clipvg": "clip-vg"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, nargs="?", default=Path("/tmp/hivg_full"), help="the --full folder")
    ap.add_argument("exe", nargs="?", default="target/release/groundkit", help="the groundkit binary")
    ap.add_argument("--dry-run", action="store_true", help="print the commands (and write the JSONL), run nothing")
    ap.add_argument("--work", type=Path, help="where the run folders go (default: a new temporary folder)")
    a = ap.parse_args()
    full = a.dir.resolve()
    doc = json.loads((full / "cases.json").read_text())
    assert doc["system"] == "full", "not a make_hivg_fixtures.py --full folder"
    tok = full / doc["tokenizer"]["file"]
    work = a.work or Path(tempfile.mkdtemp(prefix="hivg_full_check_"))
    work.mkdir(parents=True, exist_ok=True)
    if not a.dry_run and not Path(a.exe).exists():
        sys.exit(f"no binary at {a.exe}: cargo build --release -p gk-cli")

    def run(cmd: list, timed: bool = False) -> subprocess.CompletedProcess | None:
        cmd = [str(c) for c in cmd]
        if timed:
            cmd = ["/usr/bin/time", "-v"] + cmd
        if a.dry_run:
            print("  $ " + shlex.join(cmd))
            return None
        o = subprocess.run(cmd, capture_output=True, text=True)
        if o.returncode:
            sys.exit(f"failed ({o.returncode}): {shlex.join(cmd)}\n{o.stderr}")
        return o

    def imported(kind: str, model: str, out: Path, extra: list) -> str:
        """Imports under /usr/bin/time -v; returns 'peak RSS X MB, Y s'."""
        o = run([a.exe, "import", FAMILY[kind], "--checkpoint", full / model, "--tokenizer", tok, "--out", out]
                + extra, timed=True)
        if o is None:
            return "dry run"
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", o.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", o.stderr).group(1)
        secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
        return f"peak RSS {rss / 1e3:.0f} MB, {secs:.1f} s"

    summary = []
    for model, entry in doc["models"].items():
        kind = entry["kind"]
        size = (full / model).stat().st_size
        print(f"{model} ({kind}, {size / 1e6:.0f} MB)")
        rundir = work / Path(model).stem
        imp = imported(kind, model, rundir, [])
        print(f"  import: {imp}")
        worst = 0.0
        for c in entry["cases"]:
            o = run([a.exe, "predict", "--run", rundir, "--image", full / doc["images"][c["image"]]["path"],
                     "--expr", c["expr"], "--out", work / "p.png"])
            if o is None:
                continue
            got = json.loads(o.stdout)["bbox_xyxy"]
            err = max(abs(x - y) for x, y in zip(got, c["bbox_xyxy_clipped"]))
            worst = max(worst, err)
            print(f"  case {c['case']} {c['image']:<20} |box - ref| {err:.2e} px")
        line = (f"{model}: {size / 1e6:.0f} MB file, import {imp}, {len(entry['cases'])} cases, "
                + ("not run" if a.dry_run else f"max |box - ref| {worst:.2e} px"))
        b = entry.get("batched")
        if b:
            # HiVG's own cross-sample bridge: one batch of len(order) in that order
            run2 = work / (Path(model).stem + "_batched")
            imp2 = imported(kind, model, run2, ["--bridge-mode", "batched"])
            print(f"  import --bridge-mode batched: {imp2}")
            jsonl = work / "hivg_full_batched.jsonl"
            with open(jsonl, "w", encoding="utf-8") as f:
                for k, (ci, box) in enumerate(zip(b["order"], b["bbox_xyxy_clipped"])):
                    c = entry["cases"][ci]
                    im = doc["images"][c["image"]]
                    f.write(json.dumps({"id": f"hivg_full/val/{k:06d}", "dataset": "hivg_full", "split": "val",
                                        "image": str(full / im["path"]), "width": im["width"],
                                        "height": im["height"], "bbox_xyxy": box, "expr": c["expr"]},
                                       ensure_ascii=False) + "\n")
            o = run([a.exe, "eval", "--run", run2, "--data", jsonl, "--images", "/", "--batch", len(b["order"]),
                     "--json"])
            if o is not None:
                rep = json.loads(o.stdout)[jsonl.stem]["all"]
                print(f"  batched {b['order']}: eval n {rep['n']}, mIoU {rep['miou']:.4f}, Acc@0.5 {rep['acc50']:.2f}")
                line += f"; batched {b['order']}: mIoU {rep['miou']:.4f} (import {imp2})"
        summary.append(line)
    print("\n" + "\n".join(summary))
    print(f"(run folders in {work})")


if __name__ == "__main__":
    main()

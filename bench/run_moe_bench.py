"""forgekit MoE build vs mlx_lm.convert on a random-weight Qwen3.5 MoE checkpoint with the real
35B-A3B widths (bench/make_moe_checkpoint.py: hidden 2048, 256 experts, expert ffn 512).
Not a test: numbers go to docs/benchmarks.md.

    python bench/run_moe_bench.py                       # 2 layers + head
    python bench/run_moe_bench.py --layers 2 4 --out /tmp/forgekit-moe-bench

For each layer count, in a fresh cache: the full `doit build` (recipe extends qwen3.5-moe-mtp with
the checkpoint's own fused head, `verify: []` for random weights), wall time and peak RSS of the
whole process tree (bench/run_bench.py's /proc poller); then `python -m mlx_lm convert -q --q-bits 4
--q-group-size 64` on the same body, measured the same way, and whether forgekit's trunk is bit
for bit its output. Writes <out>/moe-results.json and prints a markdown table. Caches and outputs
are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import doit, measure, same_trunk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_RECIPE = ROOT / "recipes" / "qwen3.5-moe-mtp.yaml"


def write_recipe(out: Path, layers: int, ckpt: Path) -> Path:
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    path = out / "recipes" / f"moe-bench-{layers}L.yaml"
    path.write_text(f"extends: {BASE_RECIPE}\nname: moe-bench-{layers}L\n"
                    f"sources:\n  body: {{path: {ckpt / f'body-{layers}L'}}}\n"
                    f"  mtp: {{path: {ckpt / 'head.safetensors'}, table: mtp_hf}}\n"
                    f"output: {{dir: {out / 'build' / f'{layers}L'}}}\nverify: []   # random weights\n")
    return path


def warm(paths: list[Path]) -> None:
    """Page cache warm for every tool alike."""
    for f in paths:
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("FORGEKIT_BENCH_DIR", "/tmp/forgekit-moe-bench")))
    ap.add_argument("--layers", type=int, nargs="+", default=[2])
    ap.add_argument("--no-convert", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    ckpt = out / "ckpt"
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_moe_checkpoint.py"), "--out", str(ckpt),
                    "--layers", *map(str, args.layers)], check=True)
    results: dict = {"machine": {"cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]},
                     "builds": {}}
    for layers in args.layers:
        body = ckpt / f"body-{layers}L"
        warm(sorted(body.glob("*.safetensors")) + [ckpt / "head.safetensors"])
        recipe = write_recipe(out, layers, ckpt)
        cache, built = out / f"cache-{layers}L", out / "build" / f"{layers}L"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(built, ignore_errors=True)
        full = measure(doit(recipe, cache, out), {"FORGEKIT_CACHE": str(cache)}, cwd=out)
        row = {"source_gib": round(sum(p.stat().st_size for p in body.glob("*.safetensors")) / 2**30, 2),
               "head_gib": round((ckpt / "head.safetensors").stat().st_size / 2**30, 2),
               "build": {k: v for k, v in full.items() if k != "output"},
               "shard_lines": [x.strip() for x in full["output"].splitlines() if x.strip().startswith("built ")]}
        if not args.no_convert:
            ref = out / f"convert-{layers}L"
            shutil.rmtree(ref, ignore_errors=True)
            conv = measure([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(body), "--mlx-path", str(ref),
                            "-q", "--q-bits", "4", "--q-group-size", "64"])
            row["convert"] = {k: v for k, v in conv.items() if k != "output"}
            row["bit_identical"] = same_trunk(built, ref)
            row["build_over_convert"] = round(full["wall_s"] / conv["wall_s"], 3)
            shutil.rmtree(ref, ignore_errors=True)
        results["builds"][str(layers)] = row
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(built, ignore_errors=True)
    (out / "moe-results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(r: dict) -> str:
    lines = ["| layers | source bf16 (+ head) | forgekit wall | CPU (others) | peak RSS, tree | mlx_lm.convert wall "
             "| convert peak RSS | forgekit / convert | bit-identical |", "|---|---|---|---|---|---|---|---|---|"]
    for layers, row in r["builds"].items():
        b, c = row["build"], row.get("convert", {})
        lines.append(f"| {layers} | {row['source_gib']} GiB (+{row['head_gib']} GiB) | {b['wall_s']:.1f} s | "
                     f"{b['cpu_s']:.1f} s ({b['others_cpu_s']:.1f} s) | {b['peak_tree_rss_mib']:.0f} MiB | "
                     f"{c.get('wall_s', float('nan')):.1f} s | {c.get('peak_tree_rss_mib', float('nan')):.0f} MiB | "
                     f"{row.get('build_over_convert', '-')} | {row.get('bit_identical', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

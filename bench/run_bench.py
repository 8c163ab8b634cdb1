"""forgekit build performance vs mlx_lm.convert, on random-weight Qwen3.5 checkpoints with the
real 9B widths (bench/make_checkpoint.py). Not a test: numbers go to the README.

    python bench/run_bench.py                       # 2/4/8 layers, mlx_lm.convert on 4 layers
    python bench/run_bench.py --layers 4 --convert-layers 4 --out /tmp/forgekit-bench

Measures, each in a fresh cache (so a full build includes hashing the sources):
  - full `doit build` wall time and peak RSS of the whole process tree (sum of VmRSS of the
    doit process and all its descendants, polled from /proc every 20 ms), for each layer count
  - `python -m mlx_lm convert -q --q-bits 4 --q-group-size 64` on the same body, same way
  - no-op rebuild (median of 3), and a rebuild after changing only the MTP rule (head -> 8 bit)
  - the compute floor: mx.quantize throughput of one core (32 MiB bf16 chunks, g64 4-bit)
    times the usable cores, applied to the bytes the build quantizes
  - that forgekit's trunk tensors equal mlx_lm.convert's bit for bit
Everything (checkpoints ~8.4 GB, caches, outputs) goes under --out, default
/tmp/forgekit-bench (outside the repository, so copying the checkout never drags it along);
caches and outputs are deleted at the end unless --keep. Writes <out>/results.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_RECIPE = ROOT / "recipes" / "qwen3.5-dense-mtp.yaml"
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- measuring a process tree


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(sum of RSS over the tree, largest single RSS)."""
    kids = _children()
    total = biggest = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        r = _rss(pid)
        total += r
        biggest = max(biggest, r)
        stack += kids.get(pid, [])
    return total, biggest


def _busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run cmd; return wall seconds, CPU seconds of the tree, CPU seconds other processes took
    meanwhile (contention), peak tree RSS, peak single-process RSS, output."""
    import resource

    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = _busy_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = peak_single = 0
    out_chunks = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        total, single = tree_rss(proc.pid)
        peak, peak_single = max(peak, total), max(peak_single, single)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    others = max(0.0, _busy_seconds() - busy - cpu)
    reader.join()
    output = "".join(out_chunks)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output}")
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 2), "others_cpu_s": round(others, 2),
            "peak_tree_rss_mib": round(peak / 2**20, 1),
            "peak_process_rss_mib": round(peak_single / 2**20, 1), "load_before": round(load, 2),
            "output": output}


# ---------------------------------------------------------------- the builds


def write_recipe(out: Path, layers: int, ckpt: Path, extra: str = "", file: str | None = None,
                 head: str = "MTP-BF16") -> Path:
    recipes = out / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    name = f"bench-{layers}L"
    path = recipes / (file or f"{name}.yaml")
    path.write_text(f"extends: {BASE_RECIPE}\nname: {name}\n"
                    f"sources:\n  body: {{path: {ckpt / f'body-{layers}L'}}}\n"
                    f"  mtp: {{path: {ckpt / f'head-{layers}L-{head}.gguf'}}}\n"
                    f"output: {{dir: {out / 'build' / f'{layers}L'}}}\nverify: []   # random weights\n{extra}")
    return path


def doit(recipe: Path, cache: Path, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(cwd), "build", f"recipe={recipe}"]


def ran(output: str) -> list[str]:
    return [line[3:].strip() for line in output.splitlines() if line.startswith(".  ")]


def quant_floor(seconds: float = 3.0) -> dict:
    """mx.quantize throughput of one process, and of one process per core at once."""
    code = ("import time, mlx.core as mx\n"
            "a = mx.random.normal((4096, 4096)).astype(mx.bfloat16); mx.eval(a)\n"
            "w = mx.quantize(a, group_size=64, bits=4); mx.eval(*w)\n"
            f"n = 0; t = time.perf_counter()\n"
            f"while time.perf_counter() - t < {seconds}:\n"
            "    w = mx.quantize(a, group_size=64, bits=4); mx.eval(*w); n += 1\n"
            "print(n * a.nbytes / (time.perf_counter() - t))\n")
    one = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    cores = len(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(cores)]
    together = sum(float(p.communicate()[0]) for p in procs)
    return {"per_core_mib_s": round(one / 2**20, 1), "cores": cores,
            "all_cores_mib_s": round(together / 2**20, 1)}


def quantized_bytes(recipe: Path) -> dict:
    """Source bytes the build quantizes, and all source bytes it reads (from the plan)."""
    code = ("import json, sys\nfrom forgekit.plan import make_plan\nfrom forgekit.recipe import load_recipe\n"
            f"p = make_plan(load_recipe({str(recipe)!r}))\n"
            "q = sum(p.sources[t.role].info(t.source_key).nbytes for t in p.tensors if t.quant)\n"
            "a = sum(p.sources[t.role].info(t.source_key).nbytes for t in p.tensors)\n"
            "print(json.dumps({'quantized': q, 'all': a}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def same_trunk(ours: Path, theirs: Path) -> bool:
    """forgekit's trunk tensors == mlx_lm.convert's, bit for bit (streamed, one tensor at a time)."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("model*.safetensors")):
            with safe_open(str(f), "numpy") as h:
                out.update({k: f for k in h.keys()})
        return out

    a, b = index(ours), index(theirs)
    if set(a) != set(b):
        return False
    from forgekit.sources.safetensors_dir import read_header

    headers = {}
    for f in set(a.values()) | set(b.values()):
        headers[f] = read_header(f)

    def raw(f: Path, k: str) -> tuple[str, list, bytes]:
        header, start = headers[f]
        e = header[k]
        with open(f, "rb") as fh:
            fh.seek(start + e["data_offsets"][0])
            return e["dtype"], e["shape"], fh.read(e["data_offsets"][1] - e["data_offsets"][0])

    return all(raw(a[k], k) == raw(b[k], k) for k in sorted(a))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("FORGEKIT_BENCH_DIR", "/tmp/forgekit-bench")))
    ap.add_argument("--keep", action="store_true", help="keep the build caches and outputs")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--convert-layers", type=int, nargs="*", default=[4])
    args = ap.parse_args(argv)
    out = args.out.resolve()
    ckpt = out / "ckpt"
    t0 = time.time()
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_checkpoint.py"), "--out", str(ckpt), "--layers",
                    *map(str, args.layers)], check=True)
    for f in sorted((ckpt / "pool").glob("*.safetensors")) + sorted(ckpt.glob("*.gguf")):
        with open(f, "rb") as fh:  # page cache warm for every tool alike
            while fh.read(64 * 2**20):
                pass
    results: dict = {"machine": {"cores": len(os.sched_getaffinity(0)),
                                 "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
                                 "python": sys.version.split()[0]},
                     "floor": quant_floor(), "builds": {}, "convert": {}}
    per_core = results["floor"]["per_core_mib_s"] * 2**20
    cores = results["floor"]["cores"]
    for layers in args.layers:
        recipe = write_recipe(out, layers, ckpt)
        cache = out / f"cache-{layers}L"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out / "build" / f"{layers}L", ignore_errors=True)
        env = {"FORGEKIT_CACHE": str(cache)}
        sizes = quantized_bytes(recipe)
        full = measure(doit(recipe, cache, out), env, cwd=out)
        floor = sizes["quantized"] / (per_core * cores)
        row = {"source_gib": round(sizes["all"] / 2**30, 2), "quantized_gib": round(sizes["quantized"] / 2**30, 2),
               "full": {k: v for k, v in full.items() if k != "output"},
               "floor_s": round(floor, 2), "full_over_floor": round(full["wall_s"] / floor, 2),
               "output_gib": round(sum(p.stat().st_size for p in (out / "build" / f"{layers}L").glob("*.safetensors"))
                                   / 2**30, 2),
               "shard_lines": [line.strip() for line in full["output"].splitlines() if line.strip().startswith("built ")]}
        noops = [measure(doit(recipe, cache, out), env, cwd=out) for _ in range(3)]
        assert all(ran(n["output"]) == [] for n in noops), [n["output"] for n in noops]
        row["noop_s"] = statistics.median(n["wall_s"] for n in noops)
        row["noop_max_s"] = max(n["wall_s"] for n in noops)
        mtp_recipe = write_recipe(out, layers, ckpt, file=f"bench-{layers}L-mtp8.yaml",
                                  extra="quantization:\n  rules:\n"
                                        "    - {name: mtp-head-8bit, match: 'mtp\\..*', bits: 8}\n")
        mtp = measure(doit(mtp_recipe, cache, out), env, cwd=out)
        row["mtp_only"] = {k: v for k, v in mtp.items() if k != "output"}
        row["mtp_only"]["ran"] = ran(mtp["output"])
        row["mtp_only_over_full"] = round(mtp["wall_s"] / full["wall_s"], 3)
        alt_recipe = write_recipe(out, layers, ckpt, file=f"bench-{layers}L-alt-head.yaml", head="alt-MTP-BF16")
        alt = measure(doit(alt_recipe, cache, out), env, cwd=out)
        row["head_source"] = {k: v for k, v in alt.items() if k != "output"}
        row["head_source"]["ran"] = ran(alt["output"])
        row["head_source_over_full"] = round(alt["wall_s"] / full["wall_s"], 3)
        results["builds"][f"{layers}L"] = row
        print(json.dumps({f"{layers}L": row}, indent=1), flush=True)
        # leave the plain build in place for the comparison below
        measure(doit(recipe, cache, out), env, cwd=out)
    for layers in args.convert_layers:
        target = out / f"mlx-lm-convert-{layers}L"
        shutil.rmtree(target, ignore_errors=True)
        conv = measure([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(ckpt / f"body-{layers}L"),
                        "--mlx-path", str(target), "-q", "--q-bits", "4", "--q-group-size", "64"])
        row = {k: v for k, v in conv.items() if k != "output"}
        if f"{layers}L" in results["builds"]:
            ours = results["builds"][f"{layers}L"]["full"]["wall_s"]
            row["forgekit_over_convert"] = round(ours / conv["wall_s"], 3)
            row["trunk_bit_identical"] = same_trunk(out / "build" / f"{layers}L", target)
        results["convert"][f"{layers}L"] = row
        print(json.dumps({f"convert {layers}L": row}, indent=1), flush=True)
        shutil.rmtree(target, ignore_errors=True)
    if not args.keep:
        for layers in args.layers:
            shutil.rmtree(out / f"cache-{layers}L", ignore_errors=True)
        shutil.rmtree(out / "build", ignore_errors=True)
    results["bench_seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict) -> str:
    lines = ["| layers | source bf16 | full build | CPU (others) | peak RSS (tree) | floor | full/floor | no-op "
             "| MTP rule changed | head source changed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, b in r["builds"].items():
        lines.append(f"| {k} | {b['source_gib']} GiB | {b['full']['wall_s']:.1f} s | {b['full']['cpu_s']:.1f} s "
                     f"({b['full']['others_cpu_s']:.1f} s) | {b['full']['peak_tree_rss_mib']:.0f} MiB "
                     f"| {b['floor_s']:.1f} s | {b['full_over_floor']:.2f}x | {b['noop_s']:.2f} s "
                     f"| {b['mtp_only']['wall_s']:.2f} s ({100 * b['mtp_only_over_full']:.0f}%) "
                     f"| {b['head_source']['wall_s']:.2f} s ({100 * b['head_source_over_full']:.0f}%) |")
    for k, c in r["convert"].items():
        lines.append(f"\nmlx_lm.convert {k}: {c['wall_s']:.1f} s, CPU {c['cpu_s']:.1f} s (others "
                     f"{c['others_cpu_s']:.1f} s), peak RSS {c['peak_tree_rss_mib']:.0f} MiB; "
                     f"forgekit/convert = {c.get('forgekit_over_convert')}; trunk bit-identical: "
                     f"{c.get('trunk_bit_identical')}")
    f = r["floor"]
    lines.append(f"\nmx.quantize: {f['per_core_mib_s']} MiB/s on one core, {f['all_cores_mib_s']} MiB/s on "
                 f"{f['cores']} cores at once. Bench took {r.get('bench_seconds')} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

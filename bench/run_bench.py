"""forgekit build performance vs mlx_lm.convert, on random-weight Qwen3.5 checkpoints with the
real 9B widths (bench/make_checkpoint.py). Not a test: numbers go to the README.

    python bench/run_bench.py                       # 2/4/8 layers, mlx_lm.convert on 4 layers
    python bench/run_bench.py --layers 4 --convert-layers 4 --out /tmp/forgekit-bench
    python bench/run_bench.py --layers 4 8 --convert-layers 4 8 --repeat 2   # paired runs, twice

Measures, each in a fresh cache (so a full build includes hashing the sources):
  - full `doit build` wall time (cold: fresh cache, sources never hashed) and peak RSS of the whole process tree (sum of VmRSS of the
    doit process and all its descendants, polled from /proc every 20 ms), for each layer count
  - `python -m mlx_lm convert -q --q-bits 4 --q-group-size 64` on the same body, same way, right
    after forgekit's full build (paired: the ratio comes from the same moment of machine load)
  - the first no-op rebuild right after the full build, then the median of 3 more; and a rebuild
    after changing only the MTP rule (head -> 8 bit) and only the head source
  - a per-phase profile of one more cold build (FORGEKIT_PROFILE; forgekit/build/profile.py):
    wall seconds per phase in the build process and summed over the helpers
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


def tool_env(extra: dict | None = None) -> dict:
    """The environment a measured tool runs in: ours, without PYTHONDONTWRITEBYTECODE. Some
    sandboxes set it; a user's Python caches bytecode (pip compiles it at install), and without
    the cache every run recompiles forgekit's ~55 modules (~40 ms of a no-op build)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **(extra or {})}


def measure(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run cmd; return wall seconds, CPU seconds of the tree, CPU seconds other processes took
    meanwhile (contention), peak tree RSS, peak single-process RSS, output."""
    import resource

    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = _busy_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=tool_env(env), cwd=cwd, stdout=subprocess.PIPE,
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
    ap.add_argument("--repeat", type=int, default=1, help="paired full-build/convert runs per size")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled cold build")
    ap.add_argument("--table", type=Path, help="only print the table of an earlier results.json")
    args = ap.parse_args(argv)
    if args.table:
        return print(table(json.loads(args.table.read_text())))
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
                     "floor": quant_floor(), "builds": {}, "load_at_start": os.getloadavg()}
    args.floor = results["floor"]
    for layers in args.layers:
        results["builds"][f"{layers}L"] = bench_size(out, ckpt, layers, layers in args.convert_layers, args)
        print(json.dumps({f"{layers}L": results["builds"][f"{layers}L"]}, indent=1), flush=True)
    if not args.keep:
        for layers in args.layers:
            shutil.rmtree(out / f"cache-{layers}L", ignore_errors=True)
        shutil.rmtree(out / "build", ignore_errors=True)
    results["bench_seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def cold_build(out: Path, layers: int, recipe: Path, env: dict | None = None) -> dict:
    """A full build in a fresh cache (sources never hashed) into a fresh output dir."""
    cache = out / f"cache-{layers}L"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out / "build" / f"{layers}L", ignore_errors=True)
    return measure(doit(recipe, cache, out), {"FORGEKIT_CACHE": str(cache), **(env or {})}, cwd=out)


def convert(out: Path, ckpt: Path, layers: int) -> dict:
    target = out / f"mlx-lm-convert-{layers}L"
    shutil.rmtree(target, ignore_errors=True)
    conv = measure([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(ckpt / f"body-{layers}L"),
                    "--mlx-path", str(target), "-q", "--q-bits", "4", "--q-group-size", "64"])
    conv["trunk_bit_identical"] = same_trunk(out / "build" / f"{layers}L", target)
    shutil.rmtree(target, ignore_errors=True)
    return conv


def strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "output"}


def bench_size(out: Path, ckpt: Path, layers: int, with_convert: bool, args) -> dict:
    """Every number of one table row (see the module docstring)."""
    recipe = write_recipe(out, layers, ckpt)
    cache = out / f"cache-{layers}L"
    env = {"FORGEKIT_CACHE": str(cache)}
    sizes = quantized_bytes(recipe)
    floor = sizes["quantized"] / (args.floor["per_core_mib_s"] * 2**20 * args.floor["cores"])
    pairs = []
    for _ in range(max(1, args.repeat) if with_convert else 1):
        full = cold_build(out, layers, recipe)
        pair = {"forgekit": strip(full)}
        if with_convert:
            pair["convert"] = strip(convert(out, ckpt, layers))
            pair["forgekit_over_convert"] = round(full["wall_s"] / pair["convert"]["wall_s"], 3)
            pair["cpu_over_convert"] = round(full["cpu_s"] / pair["convert"]["cpu_s"], 3)
        pairs.append(pair)
    full = pairs[0]["forgekit"]
    row = {"source_gib": round(sizes["all"] / 2**30, 2), "quantized_gib": round(sizes["quantized"] / 2**30, 2),
           "full": full, "pairs": pairs, "floor_s": round(floor, 2),
           "full_over_floor": round(min(p["forgekit"]["wall_s"] for p in pairs) / floor, 2),
           "output_gib": round(sum(p.stat().st_size for p in (out / "build" / f"{layers}L").glob("*.safetensors"))
                               / 2**30, 2)}
    first = measure(doit(recipe, cache, out), env, cwd=out)   # the first no-op right after the full build
    noops = [measure(doit(recipe, cache, out), env, cwd=out) for _ in range(3)]
    assert all(ran(n["output"]) == [] for n in [first] + noops), [n["output"] for n in [first] + noops]
    row["first_noop_s"] = first["wall_s"]
    row["noop_cpu_s"] = statistics.median(n["cpu_s"] for n in [first] + noops)
    row["noop_s"] = statistics.median(n["wall_s"] for n in noops)
    row["noop_max_s"] = max(n["wall_s"] for n in noops)
    for label, rec in (("mtp_only", write_recipe(out, layers, ckpt, file=f"bench-{layers}L-mtp8.yaml",
                                                  extra="quantization:\n  rules:\n"
                                                        "    - {name: mtp-head-8bit, match: 'mtp\\..*', bits: 8}\n")),
                       ("head_source", write_recipe(out, layers, ckpt, file=f"bench-{layers}L-alt-head.yaml",
                                                    head="alt-MTP-BF16"))):
        m = measure(doit(rec, cache, out), env, cwd=out)
        row[label] = {**strip(m), "ran": ran(m["output"])}
        row[f"{label}_over_full"] = round(m["wall_s"] / full["wall_s"], 3)
        row[f"{label}_cpu_over_full"] = round(m["cpu_s"] / full["cpu_s"], 3)
        measure(doit(recipe, cache, out), env, cwd=out)   # back to the plain build
    if not args.no_profile:
        prof = out / f"profile-{layers}L.jsonl"
        prof.unlink(missing_ok=True)
        m = cold_build(out, layers, recipe, {"FORGEKIT_PROFILE": str(prof)})
        from forgekit.build.profile import read

        row["profile"] = {"wall_s": m["wall_s"], "load_before": m["load_before"], "phases": read(prof)}
    return row


def profile_table(layers: str, p: dict) -> str:
    """The phases of one profiled cold build: seconds in the build process, summed over helpers."""
    parent, helpers = p["phases"].get("parent", {}), p["phases"].get("helper", {})
    lines = [f"\nprofile, {layers} cold build ({p['wall_s']:.1f} s wall, load {p['load_before']}; "
             "phases overlap across processes; `task:` rows include the phases inside them):",
             "| phase | build process | helpers (sum) | calls | GiB |", "|---|---|---|---|---|"]
    for name in sorted(set(parent) | set(helpers), key=lambda n: (n.startswith("task"), n)):
        a, b = parent.get(name, [0.0, 0, 0]), helpers.get(name, [0.0, 0, 0])
        lines.append(f"| {name} | {a[0]:.2f} s | {b[0]:.2f} s | {a[1] + b[1]} | {(a[2] + b[2]) / 2**30:.2f} |")
    return "\n".join(lines)


def table(r: dict) -> str:
    lines = ["| layers | source bf16 | full build | CPU (others) | peak RSS (tree) | floor | full/floor "
             "| mlx_lm.convert (RSS) | forgekit/convert | first no-op | no-op | MTP rule changed | head source changed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, b in r["builds"].items():
        conv = [p for p in b["pairs"] if "convert" in p]
        c = (" / ".join(f"{p['convert']['wall_s']:.1f} s" for p in conv)
             + f" ({max(p['convert']['peak_tree_rss_mib'] for p in conv):.0f} MiB)") if conv else "-"
        ratio = " / ".join(f"{p['forgekit_over_convert']:.2f}" for p in conv) if conv else "-"
        walls = " / ".join(f"{p['forgekit']['wall_s']:.1f} s" for p in b["pairs"])
        lines.append(f"| {k} | {b['source_gib']} GiB | {walls} | {b['full']['cpu_s']:.1f} s "
                     f"({b['full']['others_cpu_s']:.1f} s) | {b['full']['peak_tree_rss_mib']:.0f} MiB "
                     f"| {b['floor_s']:.1f} s | {b['full_over_floor']:.2f}x | {c} | {ratio} | {b['first_noop_s']:.2f} s "
                     f"| {b['noop_s']:.2f} s "
                     f"| {b['mtp_only']['wall_s']:.2f} s ({100 * b['mtp_only_over_full']:.0f}%) "
                     f"| {b['head_source']['wall_s']:.2f} s ({100 * b['head_source_over_full']:.0f}%) |")
    lines.append("\nCPU seconds (less sensitive to other load than wall time): "
                 + "; ".join(f"{k}: full {b['full']['cpu_s']:.1f} s"
                             + "".join(f", convert {p['convert']['cpu_s']:.1f} s (ratio {p['forgekit']['cpu_s'] / p['convert']['cpu_s']:.2f})"
                                       for p in b["pairs"] if "convert" in p)
                             + (f", no-op {b['noop_cpu_s']:.2f} s" if "noop_cpu_s" in b else "")
                             + f", MTP rule {b['mtp_only']['cpu_s']:.1f} s ({100 * b['mtp_only']['cpu_s'] / b['full']['cpu_s']:.0f}%)"
                             + f", head source {b['head_source']['cpu_s']:.1f} s "
                               f"({100 * b['head_source']['cpu_s'] / b['full']['cpu_s']:.0f}%)"
                             for k, b in r["builds"].items()))
    lines.append("\nload average (1 min) before each full build: "
                 + ", ".join(f"{k}: " + " / ".join(str(p["forgekit"]["load_before"]) for p in b["pairs"])
                             for k, b in r["builds"].items()))
    for k, b in r["builds"].items():
        if "profile" in b:
            lines.append(profile_table(k, b["profile"]))
    f = r["floor"]
    lines.append(f"\nmx.quantize: {f['per_core_mib_s']} MiB/s on one core, {f['all_cores_mib_s']} MiB/s on "
                 f"{f['cores']} cores at once. Bench took {r.get('bench_seconds')} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

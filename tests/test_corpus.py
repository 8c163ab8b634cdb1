"""Adversarial input corpus: every case must end in one clear sentence naming the file and
key (or tensor), a non-zero exit, no traceback, and no output that looks complete.

Each case is (id, setup, expected regex[, Expect]). `setup(tmp)` writes whatever it needs under
tmp and returns the recipe text; `{body}`, `{gguf}` point at pristine copies of the fixture, and
`{tmp}` in the expected regex stands for the sandbox path. `Expect` says what a case needs
beyond that (where the recipe lives, environment, doit arguments, the exit code, and which
paths must come through byte for byte); most cases use the defaults.
The table doubles as documentation: README "Guarantees" points here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import BODY, HEAD_GGUF, ROOT, run_doit

BASE = ROOT / "recipes" / "qwen3.5-dense-mtp.yaml"
GOOD = f"extends: {BASE}\nname: t\nsources:\n  body: {{path: {{body}}}}\n  mtp: {{path: {{gguf}}}}\noutput: {{dir: out}}\n"


def good(**repl) -> str:
    text = GOOD
    for a, b in repl.items():
        text = text.replace(a, b)
    return text


def recipe_only(text):
    return lambda tmp: text


# ------------------------------------------------------------ source file doctoring helpers

def first_shard(tmp):
    return sorted((tmp / "body").glob("model-*.safetensors"))[0]


def rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def doctor_body(edit):
    def setup(tmp):
        edit(tmp)
        return GOOD
    return setup


def truncate(tmp):
    p = first_shard(tmp)
    p.write_bytes(p.read_bytes()[:-100])


def header_len_lie(tmp):
    p = first_shard(tmp)
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 10**12) + raw[8:])


def header_not_json(tmp):
    p = first_shard(tmp)
    raw = bytearray(p.read_bytes())
    raw[8:12] = b"\xff\xfe{{"
    p.write_bytes(bytes(raw))


def overlap(tmp):
    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        size_b = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size_b]
    rewrite_header(first_shard(tmp), edit)


def out_of_bounds(tmp):
    def edit(h):
        e = h[first_tensor(h)]
        size = e["data_offsets"][1] - e["data_offsets"][0]
        e["data_offsets"] = [10**9, 10**9 + size]
    rewrite_header(first_shard(tmp), edit)


def shape_mismatch(tmp):
    def edit(h):
        e = h[first_tensor(h)]
        e["shape"] = [d * 2 for d in e["shape"]]
    rewrite_header(first_shard(tmp), edit)


def bad_dtype(tmp):
    def edit(h):
        h[first_tensor(h)]["dtype"] = "F8_E9"
    rewrite_header(first_shard(tmp), edit)


def nan_weight(tmp):
    """Put a NaN into the first element of a bf16 matrix the plan maps."""
    p = first_shard(tmp)
    raw = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k.endswith("mlp.down_proj.weight"))
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start:start + 2] = np.array([0x7FC0], dtype=np.uint16).tobytes()  # bf16 quiet NaN
    p.write_bytes(bytes(raw))


def f16_overflow(tmp):
    """A finite bf16 weight (1e6) that a float16 build cannot hold: it would become inf."""
    p = first_shard(tmp)
    raw = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k.endswith("mlp.up_proj.weight"))
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start:start + 2] = np.array([1e6], np.float32).view(np.uint16)[1:].tobytes()  # bf16 of 1e6
    p.write_bytes(bytes(raw))
    return GOOD + "dtype: float16\n"


def index_missing_shard(tmp):
    idx = tmp / "body" / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "model-00009-of-00009.safetensors"
    idx.write_text(json.dumps(data))


def config_not_json(tmp):
    (tmp / "body" / "config.json").write_text("{not json")


def gguf_bad_magic(tmp):
    p = tmp / "head.gguf"
    raw = bytearray(p.read_bytes())
    raw[:4] = b"GGUX"
    p.write_bytes(bytes(raw))


def gguf_truncated(tmp):
    p = tmp / "head.gguf"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def write_gguf(path, arch: str, nextn: int | None, tensors: dict[str, np.ndarray]):
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(5)
    if nextn is not None:
        w.add_uint32(f"{arch}.nextn_predict_layers", nextn)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_wrong_arch(tmp):
    write_gguf(tmp / "head.gguf", "llama", None, {"output_norm.weight": np.ones(64, np.float32)})


def gguf_no_head(tmp):
    write_gguf(tmp / "head.gguf", "qwen35", 1, {"output_norm.weight": np.ones(64, np.float32)})


def gguf_head_wrong_shapes(tmp):
    """Every head tensor present, but from a model twice as wide as the body."""
    reader = gguf.GGUFReader(tmp / "head.gguf")
    tensors = {}
    for t in reader.tensors:
        if t.name.startswith("blk.4."):
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            tensors[t.name] = np.ones(tuple(d * 2 for d in shape), np.float32)
    write_gguf(tmp / "head.gguf", "qwen35", 1, tensors)


def auto_map_config(tmp):
    """A body config asking for remote code: it is dropped, never executed (the build succeeds)."""
    cfg = json.loads((tmp / "body" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.Model"}
    cfg["trust_remote_code"] = True
    (tmp / "body" / "config.json").write_text(json.dumps(cfg))
    (tmp / "body" / "evil.py").write_text(f"open({str(tmp / 'PWNED')!r}, 'w').write('x')\n")


# ------------------------------------------------------------ hostile input (bounded work, one line)

def alias_bomb(section: str) -> str:
    """Nine-fold fan-out over seven levels: 9**7 (4.7 million) values once every alias is expanded."""
    levels = "".join(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 7))
    return good() + f"{section}:\n  l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + levels + "  all: [*l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6]\n"


def recipe_bytes(raw: bytes):
    """A recipe holding raw bytes (carried through the text as surrogate escapes, see `write_recipe_text`)."""
    def setup(tmp):
        return good() + raw.decode("utf-8", "surrogateescape")
    return setup


def foreign_extends(tmp):
    (tmp / "secret").write_text("SECRET-LINE-ONE: do not print\n")
    return f"extends: {tmp / 'secret'}\nname: x\n"


def remove_index(tmp):
    (tmp / "body" / "model.safetensors.index.json").unlink()


def fifo_shard_no_index(tmp):
    import os
    remove_index(tmp)
    os.mkfifo(tmp / "body" / "model-zzz.safetensors")


def fifo_config(tmp):
    import os
    (tmp / "body" / "config.json").unlink()
    os.mkfifo(tmp / "body" / "config.json")


def edit_first_entry(**fields):
    def doctor(tmp):
        def edit(h):
            h[first_tensor(h)].update(fields)
        rewrite_header(first_shard(tmp), edit)
    return doctor


def first_entry_not_object(tmp):
    def edit(h):
        h[first_tensor(h)] = "BF16"
    rewrite_header(first_shard(tmp), edit)


def shape_overflow(tmp):
    """A shape whose product overflows int64 but wraps (in int64) to a small byte count."""
    def edit(h):
        e = h[first_tensor(h)]
        e["shape"] = [2**32, 2**32, 2]
    rewrite_header(first_shard(tmp), edit)


def edit_config(value):
    def doctor(tmp):
        (tmp / "body" / "config.json").write_text(json.dumps(value(json.loads((tmp / "body" / "config.json").read_text()))))
    return doctor


def remove_config(tmp):
    (tmp / "body" / "config.json").unlink()


def index_shard_named(name):
    def doctor(tmp):
        idx = tmp / "body" / "model.safetensors.index.json"
        data = json.loads(idx.read_text())
        first = next(iter(data["weight_map"]))
        data["weight_map"][first] = name
        idx.write_text(json.dumps(data))
    return doctor


def index_weight_map_list(tmp):
    idx = tmp / "body" / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))


# ------------------------------------------------------------ what a build may write: ownership, siblings, state

@dataclass(frozen=True)
class Expect:
    """A case's needs beyond (id, setup, expected). `exit` 0 is a warning case: the build completes
    and its one warning line is all of stderr. `untouched` paths (relative to the sandbox) are
    compared before and after the run, never following links; an absent one must stay absent."""

    exit: int = 2
    recipe: str = "recipe.yaml"
    env: dict = field(default_factory=dict)        # "{tmp}" in a value stands for the sandbox
    args: tuple[str, ...] = ()                     # doit arguments, e.g. ("locked=1",)
    untouched: tuple[str, ...] = ()


PLAIN = Expect()
NOT_OURS = r"exists and is not a forgekit output; choose another output\.dir or remove it"
REPLACES = r"; the build replaces its output dir, so choose another output\.dir"
NO_LINK = r" is a symlink; forgekit never writes through one: remove it and run again"
NO_VERIFY = "verify: []\n"   # warning cases build for real: no verify steps, to stay within the time bound
USER_FILES = {"notes.txt": b"the user's notes\n", "sub/data.bin": bytes(range(256)) * 4}


def snapshot(path: Path):
    """Everything at `path`, never following links: bytes, link targets, directory trees; None if absent."""
    if not os.path.lexists(path):
        return None
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(mode):
        return {p.name: snapshot(p) for p in sorted(path.iterdir())}
    return path.read_bytes() if stat.S_ISREG(mode) else ("special", stat.S_IFMT(mode))


def plant_user_files(directory: Path) -> Path:
    for rel, data in USER_FILES.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    return directory


def with_user_dir(where: str, text: str):
    """A user's directory (two files) at `where`, and the recipe `text`."""
    def setup(tmp):
        plant_user_files(tmp / where)
        return text
    return setup


def link_to_user_dir(tmp):
    (tmp / "link").symlink_to(plant_user_files(tmp / "target"), target_is_directory=True)
    return good(**{"{dir: out}": "{dir: link}"})


def regular_file_at_out(tmp):
    (tmp / "out").write_bytes(b"not a directory\x00\xff")
    return GOOD


def sibling_link(suffix: str, to_dir: bool = False):
    """A symlink at `out<suffix>` to a user's file (or directory): refused, never followed."""
    def setup(tmp):
        victim = plant_user_files(tmp / "victim")
        (tmp / f"out{suffix}").symlink_to(victim if to_dir else victim / "notes.txt")
        return GOOD
    return setup


def sibling_file(suffix: str, content: bytes, text: str = GOOD):
    def setup(tmp):
        (tmp / f"out{suffix}").write_bytes(content)
        return text
    return setup


def sibling_fifo(suffix: str):
    def setup(tmp):
        os.mkfifo(tmp / f"out{suffix}")
        return GOOD
    return setup


GARBAGE = b"this is not a sqlite database, it is damaged\n" * 40


def garbage_in_cache(rel: str):
    def setup(tmp):
        path = tmp / "cache" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(GARBAGE)
        return GOOD + NO_VERIFY
    return setup


def garbage_doit_state(tmp):
    """doit's state for `out` (cache/state/<dir name>-<xxh3 of its resolved path>.sqlite3) is not sqlite."""
    import xxhash

    out = (tmp / "out").resolve()
    return garbage_in_cache(f"state/out-{xxhash.xxh3_64_hexdigest(str(out).encode())}.sqlite3")(tmp)


def cache_record(content: str):
    """A real build fills the cache (output dir `prior`); then one object's record holds `content`."""
    def setup(tmp):
        recipe = tmp / "prior.yaml"
        recipe.write_text(GOOD.replace("{dir: out}", "{dir: prior}").replace("{body}", str(tmp / "body"))
                          .replace("{gguf}", str(tmp / "head.gguf")) + NO_VERIFY)
        proc = run_doit(recipe, tmp)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        first = sorted((tmp / "cache" / "objects").glob("*/*.json"))[0]
        first.write_text(content)
        return GOOD + NO_VERIFY
    return setup


NO_OUTPUT_DIR = good(**{"output: {dir: out}\n": ""})


CASES = [
    # ---- recipes
    ("yaml-invalid", recipe_only("name: [unclosed\n"), r"recipe\.yaml:\d+: "),
    ("yaml-duplicate-top", recipe_only("name: a\nname: b\n"), r"recipe\.yaml:2: duplicate key 'name'"),
    ("yaml-duplicate-nested", recipe_only("name: a\nsources:\n  body: {path: x}\n  body: {path: y}\n"),
     r"recipe\.yaml:4: duplicate key 'body'"),
    ("yaml-python-tag", recipe_only("name: !!python/object/apply:os.system ['touch PWNED']\n"),
     r"recipe\.yaml:1: YAML tags are not allowed"),
    ("yaml-not-mapping", recipe_only("- a\n- b\n"), r"recipe\.yaml:1: a recipe must be a YAML mapping"),
    ("unknown-top-key", recipe_only(good().replace("output:", "outptu:")), r"recipe\.yaml:6: outptu: unknown key"),
    ("unknown-source-key", recipe_only(good().replace("{path: {body}}", "{path: {body}, revison: x}")),
     r"recipe\.yaml:4: sources\.body\.revison: unknown key"),
    ("unknown-rule-key", recipe_only(good() + "remap:\n  body:\n    - {name: a, match: '.*', to: x, trasforms: []}\n"),
     r"recipe\.yaml:9: remap\.body\.0\.trasforms: unknown key"),
    ("unknown-quant-key", recipe_only(good() + "quantization:\n  default: {bitz: 4}\n"),
     r"recipe\.yaml:8: quantization\.default\.bitz: unknown key"),
    ("unknown-output-key", recipe_only(good().replace("{dir: out}", "{dir: out, shards: 3}")),
     r"recipe\.yaml:6: output\.shards: unknown key"),
    ("unknown-verify-key", recipe_only(good() + "verify:\n  - {step: structural, parms: {}}\n"),
     r"recipe\.yaml:8: verify\.0\.parms: unknown key"),
    ("unknown-verify-step", recipe_only(good() + "verify:\n  - {step: vibes}\n"), r"recipe\.yaml:8: verify\.0\.step: "),
    ("wrong-type-name", recipe_only(good().replace("name: t", "name: [t]")), r"recipe\.yaml:2: name: "),
    ("wrong-type-shard-bytes", recipe_only(good().replace("{dir: out}", "{dir: out, max_shard_bytes: big}")),
     r"recipe\.yaml:6: output\.max_shard_bytes: "),
    ("wrong-bits", recipe_only(good() + "quantization:\n  default: {bits: 7}\n"), r"recipe\.yaml:8: quantization\.default\.bits: "),
    ("bad-regex-remap", recipe_only(good() + "remap:\n  body:\n    - {name: a, match: 'model\\.(', to: x}\n"),
     r"recipe\.yaml:9: remap\.body\.0\.match: bad regular expression"),
    ("bad-regex-quant", recipe_only(good() + "quantization:\n  rules:\n    - {name: q, match: '[', quantize: false}\n"),
     r"recipe\.yaml:9: quantization\.rules\.0\.match: bad regular expression"),
    ("empty-rule-list", recipe_only(good() + "remap:\n  body: []\n"), r"recipe\.yaml:8: remap\.body: empty rule list"),
    ("rule-to-and-drop", recipe_only(good() + "remap:\n  body:\n    - {name: a, match: x, to: y, drop: true}\n"),
     r"recipe\.yaml:9: remap\.body\.0: rule 'a' needs exactly one of 'to' or 'drop: true'"),
    ("unknown-transform", recipe_only(good() + "remap:\n  body:\n    - {name: a, match: x, to: y, transforms: [flip]}\n"),
     r"recipe\.yaml:9: remap\.body\[0\]\.transforms: unknown transform 'flip'"),
    ("source-path-and-repo", recipe_only(good().replace("{path: {body}}", "{path: {body}, repo: a/b}")),
     r"recipe\.yaml:4: sources\.body: give exactly one of 'path' or 'repo'"),
    ("source-unknown-table", recipe_only(good().replace("{path: {body}}", "{path: {body}, table: nope}")),
     r"recipe\.yaml:4: sources\.body: no remap table 'nope'"),
    ("sidecar-named-model", recipe_only(good().replace("{dir: out}", "{dir: out, sidecars: [{match: 'mtp\\..*', file: model-mtp.safetensors}]}")),
     r"recipe\.yaml:6: output\.sidecars\.0\.file: sidecar file 'model-mtp\.safetensors' must be"),
    ("sidecar-escapes", recipe_only(good().replace("{dir: out}", "{dir: out, sidecars: [{match: x, file: ../x.safetensors}]}")),
     r"recipe\.yaml:6: output\.sidecars\.0\.file: "),
    ("copy-file-escapes", recipe_only(good().replace("{dir: out}", "{dir: out, copy_files: [../../etc/passwd]}")),
     r"recipe\.yaml:6: output\.copy_files\.0: '\.\./\.\./etc/passwd' must be a plain file name"),
    ("extends-missing", recipe_only("extends: no-such-base\nname: x\n"), r"recipe\.yaml:1: extends: recipe 'no-such-base' not found"),
    ("extends-self", recipe_only("extends: recipe.yaml\nname: x\n"), r"'extends' forms a cycle: recipe\.yaml -> recipe\.yaml"),
    ("output-is-body", recipe_only(good().replace("{dir: out}", "{dir: body}")), r"recipe\.yaml:6: output\.dir .* overlaps source 'body'"),
    ("output-inside-body", recipe_only(good().replace("{dir: out}", "{dir: body/out}")), r"output\.dir .* overlaps source 'body'"),
    ("output-contains-body", recipe_only(good().replace("{dir: out}", "{dir: .}")), r"output\.dir .* overlaps source 'body'"),
    ("output-symlink-into-body", lambda tmp: ((tmp / "link").symlink_to(tmp / "body"), good().replace("{dir: out}", "{dir: link/x}"))[1],
     r"output\.dir .* overlaps source 'body'"),
    # ---- sources
    ("body-missing", recipe_only(good().replace("{path: {body}}", "{path: nowhere}")), r"nowhere: source 'body' does not exist"),
    ("st-truncated", doctor_body(truncate), r"model-00001-of-00002\.safetensors: tensor '.*': data ends at byte \d+, past the end"),
    ("st-header-length-lie", doctor_body(header_len_lie), r"safetensors header length \d+ does not fit"),
    ("st-header-not-json", doctor_body(header_not_json), r"safetensors header is not valid JSON"),
    ("st-overlap", doctor_body(overlap), r"tensors '.*' and '.*' overlap in the data section"),
    ("st-out-of-bounds", doctor_body(out_of_bounds), r"tensor '.*': data ends at byte \d+, past the end of the file"),
    ("st-shape-vs-bytes", doctor_body(shape_mismatch), r"tensor '.*': BF16\[.*\] needs \d+ bytes but the header gives \d+"),
    ("st-bad-dtype", doctor_body(bad_dtype), r"tensor '.*': unsupported dtype F8_E9"),
    ("st-index-missing-shard", doctor_body(index_missing_shard), r"model\.safetensors\.index\.json: lists shard 'model-00009-of-00009\.safetensors'"),
    ("config-not-json", doctor_body(config_not_json), r"config\.json: not valid JSON"),
    ("nan-in-weights", doctor_body(nan_weight), r"tensor 'model\.language_model\.layers\.\d+\.mlp\.down_proj\.weight' .*(NaN|non-finite)"),
    ("float16-overflow", f16_overflow,
     r"tensor 'model\.language_model\.layers\.\d+\.mlp\.up_proj\.weight' has values beyond the float16 range"),
    ("gguf-bad-magic", doctor_body(gguf_bad_magic), r"head\.gguf: not a readable GGUF file"),
    ("gguf-truncated", doctor_body(gguf_truncated), r"head\.gguf: (not a readable GGUF file|tensor '.*' data runs past the end)"),
    ("gguf-wrong-arch", doctor_body(gguf_wrong_arch), r"head\.gguf: GGUF architecture 'llama' declares no MTP head"),
    ("gguf-no-head-tensors", doctor_body(gguf_no_head), r"rule 'mtp-fc' matched no tensor of source 'mtp' .*head\.gguf"),
    ("gguf-head-wrong-shapes", doctor_body(gguf_head_wrong_shapes), r"mtp\.fc\.weight.*shape"),
    # ---- hostile input: refused while planning (exit 2) in one line within HOSTILE_TIMEOUT seconds (BOUNDED)
    # recipes: bounded loading, one line naming file:line (and key)
    ("yaml-alias-bomb-runtime", recipe_only(alias_bomb("runtime")), r"recipe\.yaml:\d+: runtime\.all[.\d]*: aliases expand to more than \d+ values"),
    ("yaml-alias-bomb-config", recipe_only(alias_bomb("config")), r"recipe\.yaml:\d+: config\.all[.\d]*: aliases expand to more than \d+ values"),
    ("yaml-recursive-alias", recipe_only(good() + "runtime: &r {loop: *r}\n"), r"recipe\.yaml:7: runtime\.loop: .*recursive alias"),
    ("yaml-deep-nesting", recipe_only(good() + "runtime: {x: " + "[" * 5000 + "]" * 5000 + "}\n"), r"recipe\.yaml:7: nested more than \d+ levels deep"),
    ("yaml-nul-byte", recipe_bytes(b"description: a\x00b\n"), r"recipe\.yaml:7: NUL byte in the recipe"),
    ("yaml-non-utf8", recipe_bytes(b"description: caf\xe9\n"), r"recipe\.yaml:7: not UTF-8 text \(byte 0xe9\)"),
    ("yaml-date-value", recipe_only(good() + "config:\n  set: {release: 2024-01-01}\n"),
     r"recipe\.yaml:8: config\.set\.release: '2024-01-01' is read by YAML as a date; quote it"),
    ("yaml-binary-value", recipe_only(good() + "runtime: {blob: !!binary aGVsbG8=}\n"),
     r"recipe\.yaml:7: YAML tags are not allowed \(!!binary\) at 'runtime\.blob'"),
    ("yaml-set-value", recipe_only(good() + "verify:\n  - {step: structural, params: {x: !!set {a, b}}}\n"),
     r"recipe\.yaml:8: YAML tags are not allowed \(!!set\) at 'verify\.0\.params\.x'"),
    ("yaml-merge-key", recipe_only(good() + "runtime:\n  base: &b {x: 1}\n  more:\n    <<: *b\n"),
     r"recipe\.yaml:10: runtime\.more: YAML merge keys \('<<'\) are not supported"),
    ("yaml-nan-value", recipe_only(good() + "runtime: {temp: .nan}\n"), r"recipe\.yaml:7: runtime\.temp: '\.nan' is not a finite number"),
    ("yaml-non-text-key", recipe_only(good() + "config:\n  set: {1: x}\n"), r"recipe\.yaml:8: config\.set: mapping key '1' is not text; quote it"),
    ("extends-foreign-file", foreign_extends, r"recipe\.yaml:1: extends: '.*secret' is not a recipe: give a recipe name or a path ending in \.yaml"),
    ("regex-nested-quantifier", recipe_only(good() + "remap:\n  body:\n    - {name: a, match: '(a+)+b', to: x}\n"),
     r"recipe\.yaml:9: remap\.body\.0\.match: rule 'a': regular expression '\(a\+\)\+b' can backtrack catastrophically \(a quantifier nested"),
    ("regex-ambiguous-alternation", recipe_only(good() + "quantization:\n  rules:\n    - {name: q, match: '(a|ab)*c', quantize: false}\n"),
     r"recipe\.yaml:9: quantization\.rules\.0\.match: rule 'q': regular expression .* can backtrack catastrophically \(alternatives"),
    ("regex-many-wide-repeats", recipe_only(good().replace("{dir: out}", "{dir: out, sidecars: [{match: '.*a.*a.*a.*b', file: x.safetensors}]}")),
     r"recipe\.yaml:6: output\.sidecars\.0\.match: regular expression .* can backtrack catastrophically \(4 unbounded repeats"),
    # sources: refused unopened, or with the file and tensor named
    ("st-fifo-no-index", doctor_body(fifo_shard_no_index), r"model-zzz\.safetensors: safetensors file is not a regular file"),
    ("config-fifo", doctor_body(fifo_config), r"config\.json: config\.json is not a regular file"),
    ("st-shape-float", doctor_body(edit_first_entry(shape=[2.5, 4])), r"safetensors: tensor '.*': shape must be a list of at most 8 non-negative integers"),
    ("st-shape-string", doctor_body(edit_first_entry(shape="64")), r"safetensors: tensor '.*': shape must be a list"),
    ("st-offsets-float", doctor_body(edit_first_entry(data_offsets=[0.0, 8.5])), r"safetensors: tensor '.*': data_offsets must be two non-negative integers"),
    ("st-offsets-string", doctor_body(edit_first_entry(data_offsets=["0", "8"])), r"safetensors: tensor '.*': data_offsets must be two"),
    ("st-offsets-negative", doctor_body(edit_first_entry(data_offsets=[-8, 0])), r"safetensors: tensor '.*': data_offsets must be two non-negative"),
    ("st-dtype-list", doctor_body(edit_first_entry(dtype=["BF16"])), r"safetensors: tensor '.*': dtype must be a string, got list"),
    ("st-entry-not-object", doctor_body(first_entry_not_object), r"safetensors: tensor '.*': malformed header entry \(not an object\)"),
    ("st-shape-overflow", doctor_body(shape_overflow), r"safetensors: tensor '.*': BF16\[4294967296, 4294967296, 2\] needs \d{20,} bytes"),
    ("config-is-list", doctor_body(edit_config(lambda c: [c])), r"body/config\.json: must be a JSON object, got list"),
    ("config-text-config-string", doctor_body(edit_config(lambda c: {**c, "text_config": "qwen"})),
     r"body/config\.json: 'text_config' must be a JSON object, got str"),
    ("config-missing", doctor_body(remove_config), r"body/config\.json: the body source's config\.json is missing"),
    ("index-absolute-shard", doctor_body(index_shard_named("/etc/passwd.safetensors")),
     r"index\.json: shard '/etc/passwd\.safetensors' is not a \*\.safetensors file inside the model directory"),
    ("index-dotdot-shard", doctor_body(index_shard_named("../head.safetensors")),
     r"index\.json: shard '\.\./head\.safetensors' is not a \*\.safetensors file inside the model directory"),
    ("index-weight-map-list", doctor_body(index_weight_map_list), r"index\.json: not a valid safetensors index"),
    # ---- what a build may write: <out> only if absent, empty or forgekit's; siblings never followed;
    # damaged state files one line. The user's files come through byte for byte (Expect.untouched).
    ("output-user-dir", with_user_dir("mine", good(**{"{dir: out}": "{dir: mine}"})),
     rf"^forgekit: {{tmp}}/recipe\.yaml:6: output\.dir: {{tmp}}/mine {NOT_OURS}$", Expect(untouched=("mine",))),
    ("output-home", with_user_dir("home", good(**{"{dir: out}": '{dir: "~"}'})),
     rf"^forgekit: {{tmp}}/recipe\.yaml:6: output\.dir {{tmp}}/home is your home directory{REPLACES}$",
     Expect(env={"HOME": "{tmp}/home"}, untouched=("home",))),
    ("output-recipe-dir", with_user_dir("mine", good(**{"{dir: out}": "{dir: .}"})),
     rf"^forgekit: {{tmp}}/mine/recipe\.yaml:6: output\.dir {{tmp}}/mine is the recipe's directory{REPLACES}$",
     Expect(recipe="mine/recipe.yaml", untouched=("mine",))),
    ("output-symlink-to-user-dir", link_to_user_dir,
     rf"^forgekit: {{tmp}}/recipe\.yaml:6: output\.dir: {{tmp}}/target {NOT_OURS}$", Expect(untouched=("link", "target"))),
    ("output-is-cache", with_user_dir("cache", good(**{"{dir: out}": "{dir: cache}"})),
     rf"^forgekit: {{tmp}}/recipe\.yaml:6: output\.dir {{tmp}}/cache is the forgekit cache{REPLACES}$",
     Expect(untouched=("cache/notes.txt", "cache/sub"))),
    ("output-inside-cache", recipe_only(good(**{"{dir: out}": "{dir: cache/objects/mine}"})),
     rf"^forgekit: {{tmp}}/recipe\.yaml:6: output\.dir {{tmp}}/cache/objects/mine lies inside the forgekit cache "
     rf"\({{tmp}}/cache\){REPLACES}$", Expect(untouched=("cache/objects/mine",))),
    ("output-regular-file", regular_file_at_out,
     rf"^forgekit: {{tmp}}/recipe\.yaml:6: output\.dir: {{tmp}}/out {NOT_OURS}$", Expect(untouched=("out",))),
    ("output-root", recipe_only(good(**{"{dir: out}": "{dir: /}"})),
     rf"^forgekit: {{tmp}}/recipe\.yaml:6: output\.dir / is the file system root{REPLACES}$"),
    ("name-nul", recipe_only(NO_OUTPUT_DIR.replace("name: t", 'name: "bad\\0name"')),
     r"^forgekit: {tmp}/recipe\.yaml:2: name: 'bad\\x00name' must be a plain name \(no '/', '\\', '\.\.' or control "
     r"characters\): it names the output dir build/<name>$", Expect(untouched=("build",))),
    ("name-dotdot", recipe_only(NO_OUTPUT_DIR.replace("name: t", 'name: "../escape"')),
     r"^forgekit: {tmp}/recipe\.yaml:2: name: '\.\./escape' must be a plain name \(no '/', '\\', '\.\.' or control "
     r"characters\): it names the output dir build/<name>$", Expect(untouched=("build", "escape", "../escape"))),
    ("staging-symlink", sibling_link(".staging", to_dir=True), rf"^forgekit: {{tmp}}/out\.staging{NO_LINK}$",
     Expect(untouched=("victim", "out.staging", "out"))),
    ("staging-user-dir", with_user_dir("out.staging", GOOD),
     r"^forgekit: {tmp}/out\.staging exists and is not a forgekit staging dir; remove it and run again$",
     Expect(untouched=("out.staging", "out"))),
    ("build-lock-symlink", sibling_link(".build-lock"), rf"^forgekit: {{tmp}}/out\.build-lock{NO_LINK}$",
     Expect(untouched=("victim", "out.build-lock", "out"))),
    ("build-lock-malformed", sibling_file(".build-lock", b"my shopping list\n"),
     r"^forgekit: {tmp}/out\.build-lock is not a forgekit build lock \(it holds something other than a pid\); "
     r"remove it and run again$", Expect(untouched=("out.build-lock", "out"))),
    ("build-lock-fifo", sibling_fifo(".build-lock"),
     r"^forgekit: {tmp}/out\.build-lock exists and is not a forgekit file; remove it and run again$",
     Expect(untouched=("out.build-lock", "out"))),
    ("lock-json-foreign-locked", sibling_file(".lock.json", b"a user's file\n"),
     r"^forgekit: {tmp}/out\.lock\.json: not a readable lock file \(Expecting value: line 1 column 1 \(char 0\)\); "
     r"remove it and build once without --locked \(or run `forgekit lock RECIPE`\) to record the sources again$",
     Expect(args=("locked=1",), untouched=("out.lock.json", "out"))),
    ("lock-json-list", sibling_file(".lock.json", b'["a list"]\n'),
     r"^forgekit: {tmp}/out\.lock\.json: not a forgekit lock file \(version 1\); remove it and build once without "
     r"--locked", Expect(untouched=("out.lock.json", "out"))),
    ("lock-json-symlink", sibling_link(".lock.json"), rf"^forgekit: {{tmp}}/out\.lock\.json{NO_LINK}$",
     Expect(args=("locked=1",), untouched=("victim", "out.lock.json", "out"))),
    ("state-outputs-registry-corrupt", garbage_in_cache("outputs.sqlite3"),
     r"^forgekit: {tmp}/cache/outputs\.sqlite3 is corrupt \(.*\); remove it", Expect(untouched=("cache/outputs.sqlite3", "out"))),
    ("state-doit-corrupt", garbage_doit_state,
     r"^forgekit: {tmp}/cache/state/out-[0-9a-f]{16}\.sqlite3 is corrupt \(.*\); remove it \(the next build runs its "
     r"tasks again and reuses the valid cache objects\)$", Expect(untouched=("out",))),
    ("state-stat-memo-corrupt", garbage_in_cache("stat-memo.sqlite3"),
     r"^forgekit: warning: {tmp}/cache/stat-memo\.sqlite3 is corrupt \(.*\); replaced it by an empty stat memo "
     r"\(it only saves re-hashing\)$", Expect(exit=0)),
    ("cache-record-list", cache_record("[1, 2]"),
     r"^forgekit: warning: {tmp}/cache/objects/[0-9a-f]{2}/[0-9a-f]+\.json is not a valid cache record; "
     r"its object is rebuilt$", Expect(exit=0, untouched=("prior",))),
    ("cache-record-string", cache_record('"text"'),
     r"^forgekit: warning: {tmp}/cache/objects/[0-9a-f]{2}/[0-9a-f]+\.json is not a valid cache record; "
     r"its object is rebuilt$", Expect(exit=0, untouched=("prior",))),
]
CASES = [c if len(c) == 4 else (*c, PLAIN) for c in CASES]


FIRST_HOSTILE = "yaml-alias-bomb-runtime"
BOUNDED = {c[0] for c in CASES[[c[0] for c in CASES].index(FIRST_HOSTILE):]}
HOSTILE_TIMEOUT = 10


def write_recipe_text(path, text: str) -> None:
    """Write a case's recipe; surrogate escapes become the raw (non-UTF-8) bytes they stand for."""
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


@pytest.fixture
def sandbox(tmp_path):
    shutil.copytree(BODY, tmp_path / "body")
    shutil.copy(HEAD_GGUF, tmp_path / "head.gguf")
    return tmp_path


def run_case(tmp: Path, setup, expect: Expect, timeout: float = 900, before: dict | None = None):
    """Set the case up in `tmp`, write its recipe where `expect` says, run `doit build` on it for real.
    `before` (if given) receives a snapshot of the untouched paths just before the run."""
    text = setup(tmp).replace("{body}", str(tmp / "body")).replace("{gguf}", str(tmp / "head.gguf"))
    recipe = tmp / expect.recipe
    recipe.parent.mkdir(parents=True, exist_ok=True)
    write_recipe_text(recipe, text)
    if before is not None:
        before.update({rel: snapshot(tmp / rel) for rel in expect.untouched})
    env = {k: v.replace("{tmp}", str(tmp)) for k, v in expect.env.items()}
    return run_doit(recipe, tmp, env=env, args=expect.args, timeout=timeout)


@pytest.mark.parametrize("case_id,setup,expected,expect", CASES, ids=[c[0] for c in CASES])
def test_corpus_case(sandbox, case_id, setup, expected, expect):
    bounded = case_id in BOUNDED  # hostile input: must end fast (a hang fails as TimeoutExpired), in one line
    before = {}
    proc = run_case(sandbox, setup, expect, timeout=HOSTILE_TIMEOUT if bounded else 900, before=before)
    output = proc.stdout + proc.stderr
    if bounded:
        assert proc.returncode == expect.exit, output
        lines = proc.stderr if expect.exit == 0 else output   # a warning case: doit's task lines on stdout
        assert len([ln for ln in lines.splitlines() if ln.strip()]) == 1, output
        assert "SECRET-LINE" not in output
    assert proc.returncode != 0 or expect.exit == 0, output
    assert "Traceback" not in output, output
    expected = expected.replace("{tmp}", re.escape(str(sandbox)))
    assert re.search(expected, output, flags=re.M), f"expected /{expected}/ in:\n{output}"
    assert not (sandbox / "PWNED").exists()
    assert {rel: snapshot(sandbox / rel) for rel in expect.untouched} == before
    out = sandbox / "out"
    complete = (out / "mtplx_runtime.json").exists() or (out / ".forgekit" / "manifest.json").exists()
    assert complete == (expect.exit == 0)   # a refusal leaves nothing that looks complete; a warning builds


def test_corpus_is_large_enough():
    assert len(CASES) >= 90 and len({c[0] for c in CASES}) == len(CASES)


def test_remote_code_config_is_dropped_never_executed(sandbox):
    auto_map_config(sandbox)
    text = GOOD.replace("{body}", str(sandbox / "body")).replace("{gguf}", str(sandbox / "head.gguf"))
    (sandbox / "recipe.yaml").write_text(text)
    proc = run_doit(sandbox / "recipe.yaml", sandbox)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = json.loads((sandbox / "out" / "config.json").read_text())
    assert "auto_map" not in cfg and not (sandbox / "PWNED").exists()
    assert not (sandbox / "out" / "evil.py").exists()


def test_corpus_table_lists_every_case():
    """tests/CORPUS.md (made by tests/corpus_table.py) documents exactly these cases, in order."""
    table = (ROOT / "tests" / "CORPUS.md").read_text()
    listed = re.findall(r"^\| \d+ \| `([^`]+)` \|", table, flags=re.M)
    assert listed == [c[0] for c in CASES], "CASES changed: run `python tests/corpus_table.py`"


EARLIER_KEPT = ["unknown-quant-key", "st-truncated", "nan-in-weights", "float16-overflow", "gguf-head-wrong-shapes"]


@pytest.mark.parametrize("case_id", EARLIER_KEPT)
def test_refused_input_leaves_the_earlier_artifact_untouched(sandbox, case_id):
    """A good build first, then a bad input for the same output dir, refused while planning
    (exit 2), by a shard task (exit 1) or by a verify step (exit 1): not one byte of the
    earlier artifact changes."""
    verify = "verify: [{step: structural, params: {head_dtype: BF16}}]\n"
    fill = lambda text: text.replace("{body}", str(sandbox / "body")).replace("{gguf}", str(sandbox / "head.gguf"))  # noqa: E731
    (sandbox / "recipe.yaml").write_text(fill(GOOD) + verify)
    assert run_doit(sandbox / "recipe.yaml", sandbox).returncode == 0
    out = sandbox / "out"
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    _, setup, expected, _ = next(c for c in CASES if c[0] == case_id)
    (sandbox / "recipe.yaml").write_text(fill(setup(sandbox)) + verify)
    proc = run_doit(sandbox / "recipe.yaml", sandbox)
    assert proc.returncode != 0 and re.search(expected, proc.stdout + proc.stderr), proc.stdout + proc.stderr
    assert {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before

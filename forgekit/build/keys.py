"""Keys: what decides whether a build's outputs are still right, as a frozen BuildKeys.

- file key (one per output file): xxh3 of exactly what determines the object's bytes
  (tensor names, source digests, transforms, dtypes, shapes, quantization, library
  versions, FORMAT_VERSION); not its file name, recipe or output dir, so recipes sharing a
  body share its shard objects.
- build key: the file keys plus every non-tensor input (meta files, verify steps, runtime
  block, recipe names) and the digest of the code that writes/verifies the output.

Source digests are memoised by stat, so a no-op build reads no source bytes. The plan is
never changed: keys are returned next to it.
"""

from __future__ import annotations

import functools
import marshal
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, settings
from ..faults import checkpoint
from ..plan import BuildPlan
from . import outputs
from .memo import StatMemo, hash_bytes, key_of
from .store import FORMAT_VERSION

_PACKAGE = Path(__file__).resolve().parent.parent
# The code that decides the non-tensor output (meta files, verification, staging and
# publishing): a real change to it re-runs stage/verify/publish, never the shards.
OUTPUT_CODE = ("build/outputs.py", "build/card.py", "build/stage.py", "build/publish.py", "mtp_head.py", "verify/*.py")


@dataclass(frozen=True)
class BuildKeys:
    digests: dict[str, dict[str, str]]    # role -> source file -> xxh3_128
    file_keys: dict[str, str]             # output file -> action key (= its cache object's key)
    build_key: str


def library_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("mlx", "gguf", "safetensors", "numpy")}


def _normalized(code):
    """A code object with its line numbers and file name blanked, nested code objects too."""
    consts = tuple(_normalized(c) if hasattr(c, "co_code") else c for c in code.co_consts)
    return code.replace(co_consts=consts, co_firstlineno=1, co_linetable=b"", co_filename="")


def code_fingerprint(path: Path) -> str:
    """A digest of what a module does: its compiled bytecode without line numbers or docstrings
    (compiled with optimize=2), so editing a comment, a docstring or the formatting changes
    nothing. (optimize=2 also drops `assert` statements; the output-deciding code has none, and
    a check that matters raises, it does not assert.) About 3x cheaper than an AST dump, which
    matters because every build, a no-op included, computes it."""
    code = compile(path.read_text(), "", "exec", optimize=2)
    return hash_bytes(marshal.dumps(_normalized(code), 2))   # version 2: no refcount-dependent refs


CODE_MEMO = "code-fingerprints.json"   # under the cache: xxh3 of a module's bytes -> its fingerprint


def _known_fingerprints(files: list[Path]) -> dict[str, str]:
    """code_fingerprint of each file, parsed only when its bytes are new to the cache's memo
    (parsing the output code took a third of a no-op build's time). The memo is keyed by
    content, so it can never answer for changed code; a damaged memo is ignored."""
    import json

    from ..fileio import atomic_write_json
    from .memo import hash_bytes

    path = settings.cache_root() / CODE_MEMO
    try:
        memo = json.loads(path.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    out, current, changed = {}, {}, False
    for f in files:
        content = hash_bytes(f.read_bytes())
        known = memo.get(content)
        if not isinstance(known, str):
            known, changed = code_fingerprint(f), True
        out[str(f)] = current[content] = known
    if changed:   # only this code's entries are kept: the memo stays a few lines
        try:
            atomic_write_json(path, current, memo=True)
        except OSError:
            pass   # a read-only cache only costs re-parsing
    return out


@functools.cache
def code_digest(package: Path = _PACKAGE) -> str:
    """Digest of the output-deciding code (OUTPUT_CODE). Shard bytes are versioned by
    store.FORMAT_VERSION instead (a rebuild costs real time). Cached: code does not change
    while a process runs."""
    files = sorted(f for pattern in OUTPUT_CODE for f in package.glob(pattern))
    prints = _known_fingerprints(files)
    return key_of({f.relative_to(package).as_posix(): prints[str(f)] for f in files})


def source_digests(plan: BuildPlan, memo: StatMemo, pool=None) -> dict[str, str]:
    """Source file -> xxh3 digest, memoised by stat. New or changed sources totalling more
    than settings.hash_in_pool_bytes() are hashed on the worker pool (one file per process),
    which also starts the pool while the parent is otherwise idle: a build is coming."""
    used = {f for t in plan.tensors for f in t.source_files()}
    digest_of = {f: memo.lookup(f) for f in used}
    unknown = [f for f, d in digest_of.items() if d is None]
    if pool is not None and sum(os.path.getsize(f) for f in unknown) > settings.hash_in_pool_bytes():
        for f, (digest, unchanged) in pool.hash_files(unknown).items():
            digest_of[f] = digest
            if unchanged:
                memo.remember(Path(f), digest)
    return {f: d if d is not None else memo.digest(Path(f)) for f, d in digest_of.items()}


def file_key(entries, flat: dict[str, str], versions: dict) -> str:
    """Exactly what determines an object's bytes; not its file name, recipe or output dir."""
    return key_of({
        "forgekit_format": FORMAT_VERSION, "versions": versions, "metadata": {"format": "mlx"},
        "tensors": [{"key": t.key, "source": t.source_key, "source_digest": flat[t.source_file],
                     "stored_as": t.stored_as, "transforms": t.transforms, "dtype": t.dtype,
                     "shape": t.shape, "quant": t.quant.model_dump() if t.quant else None,
                     # split/stack outputs: every contributing source (the 1:1 key stays as it was)
                     **({"segments": [[g.source_key, flat[g.source_file], list(g.rows)] for g in t.segments]}
                        if t.segments else {})}
                    for t in entries],
    })


def build_keys(plan: BuildPlan, pool=None) -> BuildKeys:
    """Source file digests, the action key of every output file, the build key."""
    memo = StatMemo()
    flat = source_digests(plan, memo, pool)
    checkpoint("plan.hashed")
    used = set(flat)
    digests = {role: {str(f): flat[str(f)] for f in src.files if str(f) in used}
               for role, src in plan.sources.items()}
    versions = library_versions()
    file_keys = {name: file_key(entries, flat, versions) for name, entries in plan.files.items()}
    copied = {n: memo.digest(p) for n, p in outputs.copied_files(plan).items()}
    r = plan.recipe
    build_key = key_of({
        "files": file_keys, "copied": copied, "config": outputs.config_json(plan),
        "index": outputs.index_json(plan) if plan.indexed_files else None,
        "verify": [s.model_dump() for s in r.verify], "runtime": r.runtime,
        "provenance": plan.provenance, "description": r.description, "name": r.name,
        "card": r.card.model_dump(),
        "recipe_files": [Path(f).name for f in r.recipe_files],  # the model card names them
        "code": code_digest(), "forgekit": __version__,
        "host": [platform.system(), platform.machine(), platform.python_version()],  # mtplx_runtime.json
    })
    return BuildKeys(digests, file_keys, build_key)

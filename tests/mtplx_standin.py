"""Test-only stand-in that lets the real MTPLX runtime import on Linux.

Why: mtplx 2.12.x runs on Linux with mlx's CPU backend, except that `mtplx/route_tape.py`
opens macOS's C library at import time, unconditionally:

    _libsystem = ctypes.CDLL("/usr/lib/libSystem.B.dylib")

and uses three of its functions, all for timestamps of its optional per-round route log
("Route Tape", off unless enabled), never for anything that decides a token:
    mach_timebase_info(&info)      at import (numerator/denominator of the clock tick)
    mach_continuous_time()         monotonic tick count including sleep
    sysctlbyname("kern.bootsessionuuid", ...)   boot identity, read lazily
Every other macOS library MTPLX opens is behind a `sys.platform == "darwin"` check.
glibc has none of these three symbols, so libc itself cannot stand in.

What: `install()` compiles (with the system C compiler, once per source digest) a shared
object of exactly those three functions with Linux meanings: a 1/1 timebase (ticks are
nanoseconds), CLOCK_BOOTTIME (Linux's monotonic clock that counts suspend, as the mach
one does) and /proc/sys/kernel/random/boot_id as the boot identity. It then imports
`mtplx.route_tape` with `ctypes.CDLL` redirected for that one path only, and puts
`ctypes.CDLL` back. Nothing else in MTPLX is touched, so every token the runtime
produces comes from MTPLX's own code and mlx.

This file is test code only. forgekit's package never imports it: on a machine where
mtplx does not import, forgekit's `mtplx` verify step reports itself skipped.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LIBSYSTEM = "/usr/lib/libSystem.B.dylib"

STANDIN_C = r"""
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

typedef struct { uint32_t numer; uint32_t denom; } timebase_t;

int mach_timebase_info(timebase_t *info) {   /* ticks are nanoseconds */
    info->numer = 1;
    info->denom = 1;
    return 0;
}

uint64_t mach_continuous_time(void) {        /* monotonic, counts suspend */
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int sysctlbyname(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen) {
    (void)newp; (void)newlen;
    if (strcmp(name, "kern.bootsessionuuid") != 0 || oldp == NULL || oldlenp == NULL || *oldlenp == 0) {
        errno = ENOENT;
        return -1;
    }
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f == NULL) return -1;
    char *buf = (char *)oldp;
    size_t n = fread(buf, 1, *oldlenp - 1, f);
    fclose(f);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\0')) n--;
    buf[n] = '\0';
    *oldlenp = n + 1;
    return 0;
}
"""


def build_library(directory: Path | None = None) -> Path:
    """Compile the stand-in shared object (cached by the digest of its C source)."""
    digest = hashlib.sha256(STANDIN_C.encode()).hexdigest()[:16]
    directory = Path(directory or Path(tempfile.gettempdir()) / "forgekit-mtplx-standin")
    library = directory / f"libsystem-standin-{digest}.so"
    if library.is_file():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"libsystem-standin-{digest}.c"
    source.write_text(STANDIN_C)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(partial), str(source)],
                   check=True, capture_output=True, text=True)
    partial.replace(library)          # atomic: concurrent test processes never load half a file
    return library


class _RedirectedCDLL(ctypes.CDLL):
    """ctypes.CDLL with LIBSYSTEM opened as the stand-in; every other name unchanged."""

    standin: str = ""

    def __init__(self, name, *args, **kwargs):
        super().__init__(self.standin if name == LIBSYSTEM else name, *args, **kwargs)


def install() -> Path | None:
    """Make `import mtplx` work on this machine; returns the stand-in used (None: not needed).

    Imports `mtplx.route_tape` once with the redirect in place, so later imports of mtplx
    reuse that module; `ctypes.CDLL` is restored before returning.
    """
    if sys.platform == "darwin" or "mtplx.route_tape" in sys.modules:
        return None
    library = build_library()
    original = ctypes.CDLL
    _RedirectedCDLL.standin = str(library)
    ctypes.CDLL = _RedirectedCDLL
    try:
        importlib.import_module("mtplx.route_tape")
    finally:
        ctypes.CDLL = original
    return library


def gather_mm_in_float32() -> None:
    """For MoE builds (not built yet): run mlx's `gather_mm` in float32 inside MTPLX.

    mlx's CPU backend computes bf16 `gather_mm` slowly and with bf16 accumulation; an MoE
    trunk verified on CPU should multiply in float32 and cast back to the input dtype, so
    the numbers compare to the Metal kernels' float32 accumulation. This wraps
    `mx.gather_mm` as seen by every MTPLX module already imported (and mlx itself), so
    call it after `install()` and after importing the MTPLX modules that run the MoE.
    Test code only; not needed for the dense models built today.
    """
    import mlx.core as mx

    original = getattr(mx.gather_mm, "_forgekit_original", mx.gather_mm)

    def gather_mm(a, b, *args, **kwargs):
        if a.dtype == mx.float32 and b.dtype == mx.float32:
            return original(a, b, *args, **kwargs)
        out = original(a.astype(mx.float32), b.astype(mx.float32), *args, **kwargs)
        return out.astype(a.dtype)

    gather_mm._forgekit_original = original
    mx.gather_mm = gather_mm
    for name, module in list(sys.modules.items()):
        if (name == "mtplx" or name.startswith("mtplx.")) and getattr(module, "gather_mm", None) is original:
            module.gather_mm = gather_mm

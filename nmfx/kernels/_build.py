"""Lazy build and load of the C++ kernels in ``nmfx/csrc`` (never at import time).

The first call that needs a kernel compiles the sources with
``torch.utils.cpp_extension.load`` into the default torch extensions directory (cached across
processes; rebuilt when a source changes). If that fails -- no compiler, no headers -- nmfx warns
once and every N:M linear runs dense.

A process whose kernels were built before loads the library directly (``torch.ops.load_library``)
when a record in nmfx's cache directory names it for the same sources, flags and torch: importing
``torch.utils.cpp_extension`` pulls in setuptools and adds ~5 MB to the resident memory of a
process that only runs a lowered model, and its up-to-date check runs ninja on every start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = (
    "nm_ops.cpp",
    "nm_dense.cpp",
    "nm_portable.cpp",
    "nm_avx2.cpp",
    "nm_avx512.cpp",
    "nm_bf16dot.cpp",
    "nm_bf16gemv.cpp",
    "nm_bf16pairs.cpp",
    "nm_bf16vnni.cpp",
    "nm_mask.cpp",
    "nm_linear_op.cpp",
)
EXTENSION_NAME = "nmfx_cpu_kernels"
# Setting this to 1 skips the build (as if no compiler were present); for tests and debugging.
DISABLE_ENV = "NMFX_DISABLE_KERNELS"
# The best ISA this process may use (read once, at load; see set_isa_cap): e.g. "avx2" runs on an
# AVX-512 CPU exactly what an AVX2-only one runs (its kernels, its autotuning, its cache file).
ISA_CAP_ENV = "NMFX_ISA_CAP"

# "avx512bf16": the AVX-512 kernels plus, for bf16 weights, the AVX512-BF16 dot-product path
# (nm_bf16dot.cpp) under PATH_PANELS; only where cpuid reports avx512_bf16, never picked by "auto".
ISA_CODES = {"portable": 1, "avx2": 2, "avx512": 3, "avx512bf16": 4}
# Bits above the ISA code of ``nm_gemm``'s ``isa`` argument (at most one) that force the x86
# kernels' path: expanding W in registers (any batch), the batched path on x panels (any batch),
# or the selecting GEMV (one row of x, patterns in SELECT_PATTERNS; anything else is an error).
# Without a bit the ISA's kernel picks (nm_ops.cpp).
PATH_EXPAND = 1 << 8
PATH_PANELS = 1 << 9
PATH_SELECT = 1 << 10
# The bf16 dot-product GEMV (nm_bf16gemv.cpp) under ISA avx512bf16, for bf16 weights of the
# patterns of bf16dot_supports at any rows of x (made for 1-8); elsewhere it means no bit.
PATH_GEMV = 1 << 11
# The bf16 pair-dot-product GEMM (nm_bf16pairs.cpp) under ISA avx512bf16, for bf16 weights of
# PAIRS_PATTERNS at any rows of x (made for 16+); elsewhere it means no bit.
PATH_PAIRS = 1 << 12
PAIRS_PATTERNS = frozenset({(2, 4), (4, 8), (1, 4), (1, 8)})
# The bf16 GEMM on W expanded into L2 slabs (nm_bf16vnni.cpp) under ISA avx512bf16, for bf16
# weights of a pattern whose M divides 32 (bf16vnni_supports) at any rows of x (made for 16+);
# elsewhere it means no bit.
PATH_VNNI = 1 << 13
SELECT_PATTERNS = frozenset({(1, 4), (1, 8), (2, 4), (4, 8)})


def bf16dot_supports(n: int, m: int) -> bool:
    """Patterns of the bf16 dot-product path: M divides 32 and 64 columns keep 8, 16 or 32
    values (2:4, 4:8, 8:16, 1:4, 2:8, 1:8, ...); mirrors nm_kernels.h."""
    return 0 < n < m and 32 % m == 0 and 64 // m * n in (8, 16, 32)



def bf16vnni_supports(n: int, m: int) -> bool:
    """Patterns of the bf16 slab GEMM: M divides 32 (2:4, 4:8, 1:4, 1:8, 8:16, ...); mirrors
    nm_bf16vnni.cpp."""
    return 0 < n < m <= 32 and 32 % m == 0


_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None}


def extension_available() -> bool:
    """Build (first call only) and load the kernels; ``False`` means dense fallback."""
    if _state["tried"]:
        return bool(_state["ok"])
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        cap = _isa_cap_code(os.environ.get(ISA_CAP_ENV) or "avx512bf16")  # bad: an error
        try:
            if os.environ.get(DISABLE_ENV, "") == "1":
                raise RuntimeError(f"{DISABLE_ENV}=1")
            _load()
            torch.ops.nmfx_cpu.set_isa_cap(cap)
            _state["ok"] = True
        except Exception as exc:  # any build/load failure means: run dense
            _state["error"] = exc
            logger.warning("nmfx CPU kernels unavailable (%s); N:M linears will run dense", exc)
            warnings.warn(
                f"nmfx: could not build the C++ N:M kernels ({exc}); falling back to dense "
                f"F.linear. Install a C++ compiler (g++) to get the sparse kernels.",
                RuntimeWarning,
                stacklevel=3,
            )
        _state["tried"] = True
    if _state["ok"]:
        from nmfx.kernels import _cpp_linear

        _cpp_linear.ready()  # the C++ op compiled graphs call (after the lock: it reads state)
    return bool(_state["ok"])


def loaded() -> bool:
    """Whether the kernels are loaded in this process (never builds them)."""
    return bool(_state["tried"] and _state["ok"])


def _isa_cap_code(name: str) -> int:
    if name not in ISA_CODES:
        raise ValueError(
            f"{ISA_CAP_ENV}={name!r} is not one of {list(ISA_CODES)}; unset it or pick one"
        )
    return ISA_CODES[name]


def set_isa_cap(name: str | None) -> str:
    """Run as if this CPU had no ISA above ``name`` (``None``: no cap); returns the previous
    cap. Every kernel choice honours it (automatic and forced, the autotuner and its cache key),
    so an AVX-512 host runs what an AVX2-only (``"avx2"``) or non-x86 (``"portable"``) one runs."""
    code = _isa_cap_code(name or "avx512bf16")
    if not extension_available():
        raise RuntimeError(f"set_isa_cap({name!r}): the kernels are unavailable ({build_error()})")
    previous = int(torch.ops.nmfx_cpu.set_isa_cap(code))
    _state.pop("isas", None)
    return next(k for k, v in ISA_CODES.items() if v == previous)


def build_error() -> BaseException | None:
    """Why the kernels are unavailable, if they are."""
    err = _state["error"]
    return err if isinstance(err, BaseException) else None


CFLAGS = ("-O3", "-std=c++17", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)  # at::parallel_for is inline OpenMP: without it, one thread
BUILT_RECORD = "kernels-built.json"  # in cache_dir(): the library last built for build_key()


def _load() -> None:
    if hasattr(torch.ops.nmfx_cpu, "nm_gemm"):
        return  # already loaded in this process
    if _load_recorded():
        return
    from torch.utils.cpp_extension import load

    logger.info("building nmfx CPU kernels (first use; cached afterwards)")
    load(
        name=EXTENSION_NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=False,
    )
    _record_built()


def cache_dir() -> Path:
    """nmfx's cache directory (``NMFX_CACHE_DIR``, else ``~/.cache/nmfx``): tuning results and
    the record of the built kernels."""
    return Path(os.environ.get("NMFX_CACHE_DIR") or Path.home() / ".cache" / "nmfx")


def sources_digest() -> str:
    """Digest of the kernel sources and headers (``nmfx/csrc``)."""
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*")):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def build_key() -> str:
    """What the built library depends on: sources and headers, flags, torch, the extensions
    directory it was built in."""
    parts = [sources_digest(), *SOURCES, *CFLAGS, *LDFLAGS, torch.__version__,
             str(torch.version.git_version), os.environ.get("TORCH_EXTENSIONS_DIR", "")]  # fmt: skip
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _library_file(record: dict) -> Path | None:
    """The recorded library when it is still the very file that was built (size, mtime)."""
    path = Path(record.get("path", ""))
    try:
        st = path.stat()
    except OSError:
        return None
    return path if [st.st_size, st.st_mtime_ns] == record.get("stat") else None


def _load_recorded() -> bool:
    """Load the library the record names for this ``build_key()``; False (then a normal
    build/load runs) when there is none, it changed, or loading it fails."""
    try:
        record = json.loads((cache_dir() / BUILT_RECORD).read_text())
    except (OSError, ValueError):
        return False
    path = _library_file(record) if record.get("key") == build_key() else None
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        logger.info("recorded nmfx kernels %s did not load (%s); building", path, exc)
        return False
    return hasattr(torch.ops.nmfx_cpu, "nm_gemm")


def _record_built() -> None:
    """Remember the library ``load`` just loaded, for the next process (best effort)."""
    built = [p for p in torch.ops.loaded_libraries if Path(p).name.startswith(EXTENSION_NAME)]
    if not built:
        return
    path = Path(built[-1])
    st = path.stat()
    record = {"key": build_key(), "path": str(path), "stat": [st.st_size, st.st_mtime_ns]}
    target = cache_dir() / BUILT_RECORD
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(target)  # atomic: a concurrent reader sees the old record or this one
    except OSError as exc:
        logger.debug("could not record the built kernels in %s (%s)", target, exc)


def supported_isas() -> list[str]:
    """ISA paths this CPU can run, best last (empty when the kernels are unavailable)."""
    if not extension_available():
        return []
    if "isas" not in _state:  # cpuid under the cap (set_isa_cap drops this)
        bits = int(torch.ops.nmfx_cpu.isa_support())
        _state["isas"] = [name for name, code in ISA_CODES.items() if bits & (1 << code)]
    return list(_state["isas"])  # type: ignore[call-overload]

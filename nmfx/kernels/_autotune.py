"""Per-layer autotuning: which kernel path (or dense) runs each packed weight, per rows of x.

Crossovers between the sparse paths and dense GEMM depend on the host (AVX2 vs AVX-512, MKL's
GEMV speed, cache sizes), the weight's shape, dtype and pattern, and the number of rows of x,
and are not monotone in the rows (an AVX-512 kernel once lost at 2 rows and won at 4). So for
every distinct (rows, cols, dtype, pattern) that is lowered, :func:`autotune` times every path
this host supports -- the selecting GEMV (one row), expanding W in registers, the batched path
on x panels, each ISA's, the bf16 dot-product panels and GEMV (up to :data:`GEMV_MAX_ROWS` rows),
the bf16 pair GEMM (1:4, 1:8) and slab GEMM (from :data:`VNNI_MIN_ROWS` rows), the portable
kernel -- and the dense branch (``nm_dense``: W expanded block by block per call,
then torch's GEMM; at 1-2 rows of x the AVX2 kernel expanding W in registers), at one probe
batch per bucket of rows
(:data:`BUCKETS`), interleaved, the fastest of at least five rounds per candidate (a round that
another process's time slice delayed is discarded, not averaged in: medians of five ~8 ms calls
on a busy host had sent a 1024x1024 layer to the portable kernel), and records the fastest per
bucket; candidates within :data:`NEAR_TIE` of the fastest are timed again back to back
against it over paired rounds and the median paired ratio decides (duels, recorded in the
entry). Every bucket is measured (no stop at the first loss). A candidate more than
:data:`PRUNE_FACTOR` times slower than the best is not timed at larger buckets (the portable
kernel, and expanding W once x has many rows); dense and the batched paths never are. Within :data:`NOISE_MARGIN` of the
fastest, the previous bucket's winner is kept (unless it lost this bucket's duel), so noise
does not flip neighbouring buckets.

Results are cached on disk (``$NMFX_CACHE_DIR`` or ``~/.cache/nmfx``) in one JSON file per host
key: CPU model and flags, threads, torch version and a digest of the kernel sources; an entry per
shape. A corrupt or foreign file is ignored with one warning naming it, re-measured and
rewritten; an unwritable directory warns once and works from memory. Tuning done while other
processes hold the cores (a small parallel op takes over :data:`CONTENDED_PROBE_US`, or other
processes take over 10% of the CPU, :class:`~nmfx.reporting.timing.LoadMonitor`) is used by
this process but not cached; each entry records the load it was measured under, and
:func:`table` lists this process's tuning phases with theirs.

Layers of at most :data:`LINEAR_REF_MAX_BYTES` dense bytes are also timed as ``F.linear`` (a
reference, never a choice; ``linear_ms`` in the entry): for them the lowered module's Python
call overhead can outweigh what the kernel saves, and lowering keeps such a layer as
``nn.Linear`` where it measured faster at every bucket (:mod:`nmfx.kernels._callcost`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from nmfx.kernels import _build

logger = logging.getLogger(__name__)

# 5-8: per-shape autotuning (6: batched paths never pruned; 7: avx512bf16-panels; 8:
# avx512bf16-gemv); 1-4: thresholds
# 9: fastest of the rounds, not the median; 10: F.linear reference and the load per entry;
# 11: avx512bf16-pairs timed; 12: avx512bf16-vnni timed; 13: avx512-select timed; 14: near
# ties settled by a paired duel
TABLE_VERSION = 14
CACHE_ENV = "NMFX_CACHE_DIR"
CALIBRATE_ENV = "NMFX_CALIBRATE"
# Buckets of rows of x (inclusive bounds; the last is open) and the batch timed for each.
BUCKETS: tuple[tuple[int, int | None], ...] = (
    (1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128), (129, 256), (257, None),
)  # fmt: skip
PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Every choice a bucket can hold; the index is its 4-bit code in a module's dispatch code.
CHOICES = (
    "dense", "portable", "avx2-expand", "avx2-select", "avx2-panels", "avx512-expand",
    "avx512-panels", "avx512bf16-panels", "avx512bf16-gemv", "avx512bf16-pairs",
    "avx512bf16-vnni", "avx512-select",
)  # fmt: skip
# Weights the AVX-512 selecting GEMV (nm_avx512.cpp, select16) runs: fp32 keeping 8 of 16
# columns. Elsewhere ``avx512-select`` runs the AVX2 selecting GEMV, timed as ``avx2-select``.
SELECT16 = frozenset({("float32", 2, 4), ("float32", 4, 8)})
# Rows of x up to which the bf16 dot-product GEMV is timed: it reads W once per 4 rows of x, yet
# beat the panel path and dense up to 16 rows (4096x2048 2:4, one thread, Zen 4).
GEMV_MAX_ROWS = 32
# Rows of x from which the bf16 pair GEMM (nm_bf16pairs.cpp) is timed: it works on blocks of 16
# rows of x and was made for the compute-bound batches where dense bf16 GEMMs won.
PAIRS_MIN_ROWS = 16
# Patterns it is timed for: 1:4 and 1:8 (1.2-1.6x dense at 256 rows of x on a Zen 4). At 2:4 and
# 4:8 it ran 0.8-1.0x of the dense branch once other layers' weights had left the packed one out
# of cache, while timing it with its own weight cache-resident (as tuning does) could make it
# win there: offering it would trade the dense branch for a slower path.
PAIRS_TUNED = frozenset({(1, 4), (1, 8)})
# Rows of x from which the bf16 slab GEMM (nm_bf16vnni.cpp: W expanded into L2 slabs, dense
# vdpbf16ps tiles) is timed: its tiles are 16-32 rows of x; below that the GEMV and the dense
# branch's register-expanding kernel read W once with fewer wasted lanes.
VNNI_MIN_ROWS = 9
NOISE_MARGIN = 0.03
# Candidates within this of the fastest (by the fastest rounds; at most DUEL_CONTENDERS of them)
# are timed again against the winner so far, paired (:func:`_duel`): the fastest of five rounds
# had sent 4096x11008 fp32 1:4 at one row to the dense branch where the selecting GEMV ran 6%
# faster in the sweep (timed alone, their fastest rounds were 1% apart, their medians 13%). A
# duel's rounds continue past DUEL_MIN_ROUNDS until DUEL_BUDGET_S, at most DUEL_MAX_ROUNDS.
NEAR_TIE = 0.10
DUEL_CONTENDERS = 3
DUEL_MIN_ROUNDS = 6
DUEL_MAX_ROUNDS = 30
DUEL_BUDGET_S = 0.02
PRUNE_FACTOR = 3.0
MIN_ROUNDS = 5
MAX_ROUNDS = 25
CELL_BUDGET_S = 0.02  # per bucket: rounds continue past MIN_ROUNDS until this much time
CONTENDED_PROBE_US = 500.0
# Dense bytes up to which F.linear is timed beside the candidates. Above 4 MiB a one-row call
# reads the weight for >= ~50 us, so a lowered call's few us of Python overhead cannot flip it.
LINEAR_REF_MAX_BYTES = 4 << 20
LINEAR_REF = "F.linear"
UNTUNED = -1  # dispatch code of a weight that was never tuned


class ShapeKey(NamedTuple):
    rows: int
    cols: int
    dtype: str
    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}/{self.dtype}/{self.n}:{self.m}"


def shape_key(rows: int, cols: int, dtype: torch.dtype, n: int, m: int) -> ShapeKey:
    return ShapeKey(int(rows), int(cols), str(dtype).removeprefix("torch."), int(n), int(m))


def bucket_of(batch: int) -> int:
    """Index into :data:`BUCKETS` of a call with ``batch`` rows of x."""
    for i, (_lo, hi) in enumerate(BUCKETS):
        if hi is None or batch <= hi:
            return i
    return len(BUCKETS) - 1


def encode(choices: list[str]) -> int:
    """Per-bucket choice names -> one int (4 bits per bucket), what a lowered module carries."""
    return sum(CHOICES.index(c) << (4 * i) for i, c in enumerate(choices))


def decode(code: int) -> list[str]:
    return [CHOICES[(code >> (4 * i)) & 0xF] for i in range(len(BUCKETS))]


def choice_at(code: int, bucket: int) -> str:
    return CHOICES[(code >> (4 * bucket)) & 0xF]


def choice_isa(choice: str) -> str | None:
    """The ISA a choice needs (None for dense)."""
    return None if choice == "dense" else choice.split("-")[0]


def host_choices(n: int, m: int, batch: int, dtype: str = "float32") -> list[str]:
    """The choices this host can run for one call shape (dense first); ``dtype`` as in
    :class:`ShapeKey` (the bf16 dot-product path is timed for bf16 weights only)."""
    isas = _build.supported_isas()
    out = ["dense", *(["portable"] if "portable" in isas else [])]
    for isa in ("avx2", "avx512"):
        if isa in isas:
            out += [f"{isa}-expand", f"{isa}-panels"]
    if "avx2" in isas and batch == 1 and (n, m) in _build.SELECT_PATTERNS:
        out.append("avx2-select")
    if "avx512" in isas and batch == 1 and (dtype, n, m) in SELECT16:
        out.append("avx512-select")
    if "avx512bf16" in isas and dtype == "bfloat16" and _build.bf16dot_supports(n, m):
        out.append("avx512bf16-panels")
        if batch <= GEMV_MAX_ROWS:
            out.append("avx512bf16-gemv")
    pairs = (n, m) in PAIRS_TUNED and batch >= PAIRS_MIN_ROWS
    if "avx512bf16" in isas and dtype == "bfloat16" and pairs:
        out.append("avx512bf16-pairs")
    vnni = batch >= VNNI_MIN_ROWS and _build.bf16vnni_supports(n, m)
    if "avx512bf16" in isas and dtype == "bfloat16" and vnni:
        out.append("avx512bf16-vnni")
    return out


def path_code(choice: str) -> int:
    """``nm_gemm``'s isa argument (ISA code | path bit) for a sparse choice."""
    isa, _, path = choice.partition("-")
    bits = {"": 0, "expand": _build.PATH_EXPAND, "select": _build.PATH_SELECT,
            "panels": _build.PATH_PANELS, "gemv": _build.PATH_GEMV,
            "pairs": _build.PATH_PAIRS, "vnni": _build.PATH_VNNI}[path]  # fmt: skip
    return _build.ISA_CODES[isa] | bits


# ---- host key and cache file ----


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = sorted(line.split(":", 1)[1].split())
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    return model, flags


sources_digest = _build.sources_digest


_static_key: list[dict[str, Any]] = []


def host_key() -> dict[str, Any]:
    """What a tuning result depends on. The CPU, torch and kernel sources are read once per
    process (lowering calls this per layer); the ISAs (under ``NMFX_ISA_CAP``) and the thread
    count every time."""
    if not _static_key:
        model, flags = _cpuinfo()
        _static_key.append({
            "cpu": model,
            "flags": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
            "torch": torch.__version__,
            "kernel_sources": sources_digest(),
        })  # fmt: skip
    return {**_static_key[0], "isas": _build.supported_isas(), "threads": torch.get_num_threads()}


cache_dir = _build.cache_dir  # CACHE_ENV


def cache_path(host: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(host, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"autotune-v{TABLE_VERSION}-{digest}.json"


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s", message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _valid_entry(entry: Any) -> bool:
    linear = entry.get("linear_ms", []) if isinstance(entry, dict) else None
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("choices"), list)
        and len(entry["choices"]) == len(BUCKETS)
        and all(c in CHOICES for c in entry["choices"])
        and isinstance(linear, list)
        and len(linear) in (0, len(BUCKETS))
        and all(isinstance(t, int | float) for t in linear)
    )


def _read_cache(path: Path, host: dict[str, Any]) -> dict[str, Any]:
    """The cached entries for this host, or {} (with one warning when the file is bad)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
            raise ValueError(f"version {data.get('version') if isinstance(data, dict) else '?'}")
        if data.get("host") != host:
            raise ValueError("written for another host, thread count, torch or kernel build")
        entries = data.get("entries")
        if not isinstance(entries, dict) or not all(map(_valid_entry, entries.values())):
            raise ValueError("malformed entries")
        return entries
    except (OSError, ValueError, AttributeError) as exc:
        _warn_once(
            f"bad:{path}",
            f"nmfx: ignoring the autotuning cache {path} ({exc}); re-measuring and rewriting it",
        )
        return {}


def _write_cache(path: Path, host: dict[str, Any], entries: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": TABLE_VERSION, "host": host, "entries": entries}))
        tmp.replace(path)
    except OSError as exc:
        _warn_once(
            f"unwritable:{path.parent}",
            f"nmfx: cannot write the autotuning cache in {path.parent} ({exc}); tuning results "
            f"are kept in memory for this process only (set {CACHE_ENV} to a writable directory)",
        )


# ---- measurement ----


def _synthetic(key: ShapeKey) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed values/mask of the shape (kernel speed depends on neither the values nor, for M
    in {4, 8, 16}, on where the kept ones sit): the first N of every M kept."""
    from nmfx.packed import VALUE_SLACK, _mask_bits_to_bytes

    dtype = getattr(torch, key.dtype)
    keep = torch.zeros(key.rows, key.cols // key.m, key.m, dtype=torch.bool)
    keep[..., : key.n] = True
    mask = _mask_bits_to_bytes(keep.reshape(key.rows, key.cols))
    kept = key.cols // key.m * key.n
    buf = torch.zeros(key.rows * kept + VALUE_SLACK, dtype=dtype)
    buf[: key.rows * kept].normal_()
    return buf[: key.rows * kept].view(key.rows, kept), mask


def _runner(key: ShapeKey, choice: str, values, mask, x) -> Callable[[], object]:
    args = (x, values, mask, None, key.rows, key.cols, key.n, key.m)
    if choice == "dense":
        op = torch.ops.nmfx_cpu.nm_dense.default
        return lambda: op(*args)
    op, code = torch.ops.nmfx_cpu.nm_gemm.default, path_code(choice)
    return lambda: op(*args, code)


class Fastest(dict):
    """Fastest seconds per candidate (the dict) and each candidate's median round
    (``medians``; empty where the timing was stubbed)."""

    medians: dict[str, float]

    def __init__(self, fastest: dict[str, float], medians: dict[str, float]) -> None:
        super().__init__(fastest)
        self.medians = medians


def _time_bucket(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Fastest seconds per candidate over interleaved rounds (rotating order), after one warm-up
    call each: interference only adds time, so the minimum is the estimate it disturbs least.
    Returns a :class:`Fastest` (the medians name the near ties the minimum hides)."""
    for fn in fns.values():
        fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < MIN_ROUNDS or (
        rounds < MAX_ROUNDS and time.perf_counter() - start < CELL_BUDGET_S
    ):
        order = names[rounds % len(names) :] + names[: rounds % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    medians = {name: sorted(s)[len(s) // 2] for name, s in samples.items()}
    return Fastest({name: min(s) for name, s in samples.items()}, medians)


def _settle_near_tie(
    best_s: dict[str, float], fns: dict[str, Callable[[], object]]
) -> tuple[str, list[dict[str, Any]]]:
    """The bucket's winner from the fastest times of its rounds; every candidate within
    :data:`NEAR_TIE` of the fastest, or with a faster median round than the fastest's (a path
    whose times spread widely can win by one lucky round: ``avx2-panels`` at 4.1 ms fastest,
    5.7 ms median), at most :data:`DUEL_CONTENDERS` of them, fastest first, is timed again back
    to back against the winner so far (:func:`_duel`), and each paired ratio decides. Returns
    the winner and the duels' records (none when no candidate was that close)."""
    ranked = sorted(best_s, key=best_s.__getitem__)
    top = ranked[0]
    medians = getattr(best_s, "medians", {})

    def is_close(c: str) -> bool:
        if best_s[c] <= best_s[top] * (1 + NEAR_TIE):
            return True
        return c in medians and top in medians and medians[c] < medians[top]

    close = [c for c in ranked[1:] if is_close(c)]
    winner, duels = ranked[0], []
    for challenger in close[:DUEL_CONTENDERS]:
        ratio, rounds = _duel(fns, winner, challenger)
        duels.append({"pair": [winner, challenger], "ratio": round(ratio, 4), "rounds": rounds})
        if ratio > 1.0:
            winner = challenger
    return winner, duels


def _keep_previous(
    kept: str, winner: str, best_s: dict[str, float], duels: list[dict[str, Any]]
) -> bool:
    """Whether the previous bucket's winner stays: timed here and within :data:`NOISE_MARGIN`
    of this bucket's winner (by their duel's paired ratio where the two met in one)."""
    if kept == winner or kept not in best_s:
        return False
    for duel in duels:
        if duel["pair"] == [kept, winner]:
            return duel["ratio"] <= 1 + NOISE_MARGIN
        if duel["pair"] == [winner, kept]:
            return 1.0 / duel["ratio"] <= 1 + NOISE_MARGIN
    return best_s[kept] <= best_s[winner] * (1 + NOISE_MARGIN)


def _duel(fns: dict[str, Callable[[], object]], first: str, second: str) -> tuple[float, int]:
    """Median over paired rounds of time(first) / time(second), and the rounds run: each round
    calls both, in alternating order, so drift and other processes' load fall on both alike.
    Rounds continue past :data:`DUEL_MIN_ROUNDS` while within :data:`DUEL_BUDGET_S`."""
    a, b = fns[first], fns[second]
    ratios: list[float] = []
    start = time.perf_counter()
    while len(ratios) < DUEL_MIN_ROUNDS or (
        len(ratios) < DUEL_MAX_ROUNDS and time.perf_counter() - start < DUEL_BUDGET_S
    ):
        pair = (a, b) if len(ratios) % 2 == 0 else (b, a)
        spent = []
        for fn in pair:
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
        ta, tb = spent if pair[0] is a else spent[::-1]
        ratios.append(ta / tb)
    ratios.sort()
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return median, len(ratios)


def _linear_reference(key: ShapeKey, values, mask) -> torch.Tensor | None:
    """The dense weight to time ``F.linear`` on, for layers up to LINEAR_REF_MAX_BYTES."""
    from nmfx.packed import unpack_buffers

    if key.rows * key.cols * values.element_size() > LINEAR_REF_MAX_BYTES:
        return None
    return unpack_buffers(values, mask, (key.rows, key.cols))


def measure(key: ShapeKey) -> dict[str, Any]:
    """Time every choice of this host at each bucket's probe batch; the entry for the cache."""
    import torch.nn.functional as F

    values, mask = _synthetic(key)
    dtype = getattr(torch, key.dtype)
    weight = _linear_reference(key, values, mask)
    pruned: set[str] = set()
    choices: list[str] = []
    timings: list[dict[str, float]] = []
    linear_ms: list[float] = []
    duels: list[dict[str, Any]] = []
    with torch.inference_mode():
        for rows_x in PROBE_ROWS:
            x = torch.randn(rows_x, key.cols).to(dtype)
            cands = [c for c in host_choices(key.n, key.m, rows_x, key.dtype) if c not in pruned]
            fns = {c: _runner(key, c, values, mask, x) for c in cands}
            if weight is not None:
                fns[LINEAR_REF] = lambda x=x: F.linear(x, weight)
            med = _time_bucket(fns)
            if weight is not None:
                linear_ms.append(round(med.pop(LINEAR_REF) * 1e3, 4))
            best = min(med.values())
            winner, settled = _settle_near_tie(med, fns)
            if choices and _keep_previous(choices[-1], winner, med, settled):
                winner = choices[-1]
            choices.append(winner)
            timings.append({c: round(t * 1e3, 4) for c, t in med.items()})
            duels += [{"rows": rows_x, **duel} for duel in settled]
            pruned |= {c for c, t in med.items() if _prunable(c) and t > PRUNE_FACTOR * best}
    entry = {"choices": choices, "ms": timings, "probe_rows": list(PROBE_ROWS), "duels": duels}
    return {**entry, "linear_ms": linear_ms} if weight is not None else entry


def _prunable(choice: str) -> bool:
    """Dense and the batched paths are timed at every bucket: they pad x to 32-row panels or
    run a GEMM, so they lose by far at few rows and win at many (pruning them at one row had
    sent 64-256 rows to dense where the AVX-512 batched path ran 1.5-2.4x faster)."""
    return choice != "dense" and not choice.endswith("-panels")


def _contention_probe_us() -> float:
    from nmfx.reporting.timing import parallel_op_latency_us

    return parallel_op_latency_us(calls=30)


def _load_monitor() -> Any:
    """Other processes' CPU share over a tuning phase (a seam: tests stub the machine's load)."""
    from nmfx.reporting.timing import LoadMonitor

    return LoadMonitor()


# ---- the table ----

_lock = threading.Lock()
_memory: dict[str, dict[str, Any]] = {}  # str(ShapeKey) -> entry, this process
_memory_host: list[dict[str, Any] | None] = [None]
_phases: list[dict[str, Any]] = []  # this process's tuning phases and their load


def tuning_enabled() -> bool:
    return os.environ.get(CALIBRATE_ENV, "1") != "0" and _build.extension_available()


def autotune(shapes: Iterable[ShapeKey], progress: bool = True) -> dict[ShapeKey, dict[str, Any]]:
    """Per-bucket choices for each shape: from memory, the disk cache, or measured now.

    Returns ``{shape: {"choices": [choice per bucket], "ms": [...], "source": ...}}``; with
    tuning disabled (``NMFX_CALIBRATE=0`` or no kernels) the entries are the defaults of
    :func:`default_entry` and nothing is cached.
    """
    keys = list(dict.fromkeys(shapes))
    if not tuning_enabled():
        return {k: default_entry(k) for k in keys}
    with _lock:
        host = host_key()
        if _memory_host[0] != host:
            _memory.clear()
            _memory_host[0] = host
        path = cache_path(host)
        missing = [k for k in keys if str(k) not in _memory]
        if missing:
            cached = _read_cache(path, host)
            for k in missing:
                if str(k) in cached:
                    _memory[str(k)] = {**cached[str(k)], "source": "cache"}
            todo = [k for k in missing if str(k) not in _memory]
            if todo:
                _measure_and_store(todo, path, host, cached, progress)
        return {k: _memory[str(k)] for k in keys}


def _measure_and_store(
    todo: list[ShapeKey], path: Path, host: dict[str, Any], cached: dict[str, Any], progress: bool
) -> None:
    from tqdm import tqdm

    t0 = time.perf_counter()
    probe = [_contention_probe_us()]
    bar = tqdm(todo, desc="nmfx autotune", unit="shape", delay=2.0, disable=not progress)
    fresh = {}
    with _load_monitor() as monitor:
        for k in bar:
            bar.set_postfix_str(str(k), refresh=False)
            fresh[str(k)] = measure(k)
    probe.append(_contention_probe_us())
    share = monitor.others_share
    contended = max(probe) > CONTENDED_PROBE_US or monitor.contended
    load = {
        "others_cpu_share": None if share is None else round(share, 3),
        "parallel_op_us": round(max(probe), 1),
        "contended": contended,
    }
    source = "measured-contended" if contended else "measured"
    for name, entry in fresh.items():
        fresh[name] = {**entry, "load": load}
        _memory[name] = {**fresh[name], "source": source}
    seconds = time.perf_counter() - t0
    _phases.append({"shapes": len(todo), "seconds": round(seconds, 2), **load,
                    "cached": not contended})  # fmt: skip
    logger.info("nmfx autotuned %d shapes in %.1f s (%s)", len(todo), seconds, source)
    if contended:
        taken = "" if share is None else f"other processes took {share:.0%} of the CPU, "
        logger.warning(
            "nmfx autotuned on a busy machine (%sa small parallel op took %.0f us); the result "
            "is used by this process only and measured again next time", taken, max(probe),
        )  # fmt: skip
        return
    _write_cache(path, host, {**cached, **fresh})


def default_entry(key: ShapeKey) -> dict[str, Any]:
    """Untuned: the best ISA's own path choice at every bucket (no timing)."""
    isas = [i for i in _build.supported_isas() if i != "avx512bf16"]  # timed, never a default
    best = isas[-1] if isas else None
    if best is None:
        return {"choices": ["dense"] * len(BUCKETS), "source": "default"}
    if best == "portable":
        return {"choices": ["portable"] * len(BUCKETS), "source": "default"}
    choices = []
    for rows_x in PROBE_ROWS:
        if rows_x == 1 and best == "avx512" and (key.dtype, key.n, key.m) in SELECT16:
            choices.append("avx512-select")
        elif rows_x == 1 and (key.n, key.m) in _build.SELECT_PATTERNS:
            choices.append("avx2-select")
        elif rows_x >= 32:
            choices.append("avx2-panels")
        else:
            choices.append(f"{best}-expand")
    return {"choices": choices, "source": "default"}


def table() -> dict[str, Any]:
    """Every shape tuned in this process, with the host key, cache file and the load of each
    tuning phase (``tuning_phases``: shapes, seconds, others' CPU share, cached or not)."""
    host = _memory_host[0] or host_key()
    return {
        "version": TABLE_VERSION,
        "host": host,
        "path": str(cache_path(host)),
        "buckets": [f"{lo}-{hi}" if hi != lo else str(lo) for lo, hi in BUCKETS[:-1]]
        + [f"{BUCKETS[-1][0]}+"],
        "entries": dict(_memory),
        "tuning_phases": list(_phases),
    }


def clear_memory() -> None:
    """Forget this process's tuned shapes (the disk cache stays)."""
    with _lock:
        _memory.clear()
        _phases.clear()

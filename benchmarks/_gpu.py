"""Helpers shared by the GPU benchmarks: CUDA-event medians, a time budget, plain tables, output.

Plain torch and the standard library only: on a GPU machine whose image lacks one of nmfx's
own dependencies, the raw kernel timings must still run and say what was missing.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def cuda_medians(
    fns: Mapping[str, Callable[[], Any]], warmup: int = 10, repeats: int = 15, iters: int = 20
) -> dict[str, float]:
    """Median ms per call of each function: ``repeats`` samples of ``iters`` back-to-back calls
    timed with CUDA events, the functions interleaved (A B, B A, ...) after ``warmup`` calls."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fns[name]()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / iters)
    return {name: statistics.median(v) for name, v in samples.items()}


class Budget:
    """Wall-clock budget: ``left()`` seconds remain; ``over()`` once they are spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def over(self) -> bool:
        return self.left() <= 0


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with ``columns``; floats to 3 significant places."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What GPU numbers depend on: torch, CUDA, cuSPARSELt, the device."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    try:
        env["cusparselt"] = torch.backends.cusparselt.version()
    except (AttributeError, RuntimeError):
        env["cusparselt"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
    return env


def write(out_dir: Path, name: str, payload: dict[str, Any], text: str) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.txt`` under ``out_dir``; print the text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, txt = out_dir / f"{name}.json", out_dir / f"{name}.txt"
    js.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    txt.write_text(text + "\n")
    print(text)
    return js, txt


def check_out_dir(path: Path) -> Path:
    """Fail before any work if ``path`` cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SystemExit(f"--out {path}: cannot write there ({exc}); pick a writable directory") from None
    return path

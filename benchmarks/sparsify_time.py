"""How long ``nmfx.sparsify`` takes on a large conv net and a deep decoder.

sparsify traces and rewrites every module, so its time grows with model depth; users call
it once per model, often as the first thing in a fresh process. Both cases are timed:

- cold: the first call in a fresh Python process (``import nmfx`` done, model built),
  measured in a child process per run so that lazy imports are paid every time;
- warm: later calls in one process, each on a freshly built model.

Model construction is never timed. Targets: ResNet-50 < 1 s, 24-layer LLaMA < 3 s. When a
median misses its target the script profiles that call with cProfile and prints the top
entries by cumulative time.

    PYTHONPATH=. python benchmarks/sparsify_time.py [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import subprocess
import sys
import time
from typing import Any

import torch
from _timing import (
    LoadMonitor,
    base_parser,
    describe,
    machine_info,
    median,
    ms,
    setup_threads,
    spread,
    write_json,
)
from tabulate import tabulate
from torch import nn

MODELS: dict[str, tuple[str, dict[str, Any], float]] = {
    # label: (zoo name, config overrides, target seconds)
    "resnet50": ("resnet50", {}, 1.0),
    "llama-24L": ("llama", {"n_layers": 24, "dim": 512, "n_heads": 8, "hidden_dim": 1376}, 3.0),
}
TOP = 15
NOT_IMPORT_MACHINERY = r"^(?!.*(importlib|<frozen|builtins\.exec|builtins\.__import__))"


def build(label: str) -> nn.Module:
    import model_zoo

    name, overrides, _ = MODELS[label]
    torch.manual_seed(0)
    return model_zoo.build(name, **overrides)


def time_sparsify(model: nn.Module) -> tuple[float, float, int]:
    """Wall and CPU seconds of one ``nmfx.sparsify(model)``, and how many weights went N:M.

    sparsify is single-threaded Python, so on a machine shared with other jobs its CPU
    time is close to what the wall time would be on an idle machine.
    """
    import nmfx

    cpu0, start = time.process_time(), time.perf_counter()
    nmfx.sparsify(model)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return seconds, cpu, len(nmfx.summary(model).plan.sparse)


def profile_sparsify(model: nn.Module, top: int = TOP) -> str:
    """cProfile of one sparsify call: the ``top`` entries by cumulative time."""
    import nmfx

    prof = cProfile.Profile()
    prof.enable()
    nmfx.sparsify(model)
    prof.disable()
    out = io.StringIO()
    # Import-machinery frames (lazy imports on a cold call) would fill the whole list;
    # the module whose import is slow still shows, as its own <module> entry.
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    stats.print_stats(NOT_IMPORT_MACHINERY, top)
    return out.getvalue().strip()


def child(label: str, profile: bool, preimport_dynamo: bool) -> None:
    """Cold measurement, run in a fresh process: prints one JSON line on stdout."""
    start = time.perf_counter()
    import model_zoo  # noqa: F401
    import nmfx  # noqa: F401

    import_s = time.perf_counter() - start
    if preimport_dynamo:  # diagnosis: the cold cost left once torch._dynamo is loaded
        import torch._dynamo  # noqa: F401
    model = build(label)
    if profile:
        print(json.dumps({"profile": profile_sparsify(model)}))
        return
    seconds, cpu, n_sparse = time_sparsify(model)
    print(json.dumps(
        {"import_s": import_s, "seconds": seconds, "cpu_s": cpu, "n_sparse": n_sparse}
    ))  # fmt: skip


def run_child(
    label: str, threads: int | None, profile: bool = False, preimport_dynamo: bool = False
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", label]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if profile:
        cmd.append("--profile")
    if preimport_dynamo:
        cmd.append("--preimport-dynamo")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def warm_runs(repeats: int) -> dict[str, dict[str, Any]]:
    """``repeats`` timed calls per model, models alternating, each on a fresh model."""
    import nmfx  # noqa: F401

    result: dict[str, dict[str, Any]] = {
        k: {"seconds": [], "cpu_s": [], "n_modules": 0} for k in MODELS
    }
    # Untimed: pays this process's one-time costs (lazy imports) on the cheaper model.
    time_sparsify(build(next(iter(MODELS))))
    for r in range(repeats):
        for label in MODELS if r % 2 == 0 else reversed(MODELS):
            model = build(label)
            gc.collect()
            seconds, cpu, n_sparse = time_sparsify(model)
            result[label]["seconds"].append(seconds)
            result[label]["cpu_s"].append(cpu)
            result[label]["n_sparse"] = n_sparse
            result[label]["n_modules"] = sum(1 for _ in model.modules())
            del model
    return result


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="always print cProfile tables")
    parser.add_argument("--child", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--preimport-dynamo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_threads(args.threads)
    if args.child:
        child(args.child, args.profile, args.preimport_dynamo)
        return
    cold_runs = 1 if args.quick else 3
    repeats = 2 if args.quick else 7

    info = machine_info()
    with LoadMonitor() as load:
        cold = {label: [run_child(label, args.threads) for _ in range(cold_runs)]
                for label in MODELS}  # fmt: skip
        # Diagnosis, skipped by --quick: the cold cost once torch._dynamo is imported.
        cold_dynamo = {label: [run_child(label, args.threads, preimport_dynamo=True)
                               for _ in range(0 if args.quick else cold_runs)]
                       for label in MODELS}  # fmt: skip
        warm = warm_runs(repeats)
    rows, profiles = [], {}
    for label, (_, _, target) in MODELS.items():
        cold_s = [c["seconds"] for c in cold[label]]
        cold_dyn = [c["seconds"] for c in cold_dynamo[label]]
        warm_s = warm[label]["seconds"]
        met_cold, met_warm = median(cold_s) < target, median(warm_s) < target
        rows.append([
            label, warm[label]["n_modules"], warm[label]["n_sparse"],
            ms(median(cold_s)), ms(median([c["cpu_s"] for c in cold[label]])),
            ms(median(cold_dyn)) if cold_dyn else "-", ms(median(warm_s)), ms(min(warm_s)),
            ms(median(warm[label]["cpu_s"])), round(spread(warm_s), 2),
            f"< {target:g} s", "yes" if met_cold else "no", "yes" if met_warm else "no",
        ])  # fmt: skip
        # --quick skips the (slow) automatic profiles to stay under a minute.
        auto = not args.quick
        if args.profile or (auto and not met_cold):
            profiles[f"{label} cold"] = run_child(label, args.threads, profile=True)["profile"]
        if args.profile or (auto and not met_warm):
            gc.collect()
            model = build(label)
            profiles[f"{label} warm"] = profile_sparsify(model)

    headers = [
        "model", "modules", "N:M weights", "cold ms", "cold CPU ms", "cold, dynamo loaded ms",
        "warm ms", "warm min ms", "warm CPU ms", "warm IQR/med",
        "target", "cold met", "warm met",
    ]  # fmt: skip
    print(f"nmfx.sparsify wall time (construction excluded); cold: median of {cold_runs} "
          f"fresh processes, warm: median of {repeats} fresh models in one process")  # fmt: skip
    print(tabulate(rows, headers=headers, tablefmt="github"))
    imports = {k: [round(c["import_s"], 2) for c in v] for k, v in cold.items()}
    print(f"import model_zoo + nmfx in the cold children (s): {imports}")
    for name, text in profiles.items():
        print(f"\ncProfile, {name}: top {TOP} by cumulative time, import machinery filtered "
              "out (profiling inflates times)")  # fmt: skip
        print(text)
    print("\n" + describe(info, load.result))
    path = write_json(
        "sparsify_time",
        {"machine": info, "load": load.result, "quick": args.quick, "headers": headers,
         "rows": rows, "profiles": profiles,
         "raw": {"cold": cold, "cold_dynamo_preimported": cold_dynamo, "warm": warm},
         "configs": {k: {"zoo": v[0], "overrides": v[1], "target_s": v[2]}
                     for k, v in MODELS.items()}},
        args.out,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

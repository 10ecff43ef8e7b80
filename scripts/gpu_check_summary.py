"""Summarise a ``scripts/gpu_check.sh`` run: steps, tests, the issue's targets, what was skipped.

Reads what the steps left in the output directory (``steps.tsv``, ``env.json``,
``pytest.xml``, ``gpu_linear.json``, ``gpu_e2e.json``) and writes ``summary.json`` and
``summary.txt`` there. Exit status: 0 when every step that ran passed, else 1.

    python scripts/gpu_check_summary.py OUTDIR [--dry-run 0|1] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any


def read_steps(path: Path) -> list[dict[str, Any]]:
    steps = []
    for line in path.read_text().splitlines():
        name, status, rc, seconds, reason = (line.split("\t") + [""] * 5)[:5]
        steps.append({"step": name, "status": status, "rc": rc, "seconds": int(seconds or 0),
                      "reason": reason})  # fmt: skip
    return steps


def read_junit(path: Path) -> dict[str, Any] | None:
    """Counts, failed test ids with their first message line, and skip reasons."""
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    out: dict[str, Any] = {"passed": 0, "failed": [], "skipped": []}
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            out["failed"].append({"test": test, "message": (bad.get("message") or "")[:300]})
        elif skipped is not None:
            out["skipped"].append({"test": test, "reason": (skipped.get("message") or "")[:200]})
        else:
            out["passed"] += 1
    return out


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarise(out: Path, dry_run: bool, seconds: int) -> dict[str, Any]:
    env = read_json(out / "env.json") or {}
    steps = read_steps(out / "steps.tsv") if (out / "steps.tsv").exists() else []
    partial = []
    for name in ("gpu_linear", "gpu_e2e"):
        if not (out / f"{name}.json").exists() and (out / f"{name}.partial.json").exists():
            partial.append(name)  # the step was killed: use what it saved so far
    linear, e2e = (read_json(out / f"{n}{'.partial' if n in partial else ''}.json")
                   for n in ("gpu_linear", "gpu_e2e"))  # fmt: skip
    summary: dict[str, Any] = {
        "dry_run": dry_run,
        "seconds": seconds,
        "verified_on_hardware": not dry_run and env.get("cuda_available", False),
        "device": env.get("device") or env.get("nvidia_smi") or "no GPU",
        "torch": env.get("deps", {}).get("torch"),
        "missing_deps": sorted(n for n, v in env.get("deps", {}).items() if v is None),
        "steps": steps,
        "pytest": read_junit(out / "pytest.xml"),
        "targets": {
            "gpu_linear": (linear or {}).get("headline"),
            "gpu_e2e": (e2e or {}).get("headline"),
        },
        "skipped": [f"{s['step']}: {s['reason']}" for s in steps if s["status"] == "skipped"],
        "partial_results": partial,
    }
    for name, payload in (("gpu_linear", linear), ("gpu_e2e", e2e)):
        for what in (payload or {}).get("skipped", []):
            summary["skipped"].append(f"{name}: {what}")
        if (payload or {}).get("errors"):
            summary.setdefault("errors", []).extend(
                f"{name}: {e.strip().splitlines()[-1]}" for e in payload["errors"]
            )
    summary["ok"] = all(s["status"] in ("ok", "skipped") for s in steps) and not summary.get(
        "errors"
    )
    return summary


def render(s: dict[str, Any]) -> str:
    mode = "DRY RUN (no GPU: nothing verified on hardware)" if s["dry_run"] else s["device"]
    lines = [f"nmfx gpu_check: {mode}; torch {s['torch']}; {s['seconds']} s; "
             f"{'OK' if s['ok'] else 'FAILURES'}"]  # fmt: skip
    if s["missing_deps"]:
        lines.append(f"missing dependencies: {', '.join(s['missing_deps'])}")
    for st in s["steps"]:
        lines.append(f"  {st['step']:<11} {st['status']:<8} {st['seconds']:>4} s  {st['reason']}")
    if s["pytest"] is not None:
        p = s["pytest"]
        lines.append(f"pytest: {p['passed']} passed, {len(p['failed'])} failed, "
                     f"{len(p['skipped'])} skipped")  # fmt: skip
        lines += [f"  FAILED {f['test']}: {f['message']}" for f in p["failed"]]
        reasons = Counter(x["reason"] for x in p["skipped"])
        lines += [f"  skipped x{n}: {reason}" for reason, n in reasons.most_common()]
    for name, target in s["targets"].items():
        if target:
            lines.append(f"{name} targets: " + ", ".join(f"{k}={v}" for k, v in target.items()))
    lines += [f"partial results (step killed): {x}.partial.json" for x in s["partial_results"]]
    lines += [f"skipped: {x}" for x in s["skipped"]]
    lines += [f"ERROR: {x}" for x in s.get("errors", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", type=int, choices=[0, 1], default=0)
    p.add_argument("--seconds", type=int, default=0)
    args = p.parse_args(argv)
    summary = summarise(args.out, bool(args.dry_run), args.seconds)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = render(summary)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

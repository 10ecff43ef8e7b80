"""``benchmarks/decode.py --rss-only``'s load contenders (issue 15, peak RSS of a lowered model).

``nmfx-load`` and ``dense-load`` save the ``nmfx`` / ``dense`` model in one child and load it with
``torch.load`` in a fresh process that generates: that process holds the loaded model, what its
imports hold and ``generate``'s working memory, and nothing of a build (``-mmap``: loaded with
``mmap=True``). Checked here on a tiny Llama whose MLP weights are large enough to be packed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--layers", "1", "--hidden", "512", "--mlp", "1024", "--heads", "4", "--kv-heads", "2",
        "--vocab", "256", "--new", "3", "--prompt", "8", "--batch", "1", "--dtypes", "fp32",
        "--lm-head", "sparse", "--threads", "1"]  # fmt: skip


def decode(*flags: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NMFX_CALIBRATE": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), *TINY, *flags, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_load_contenders_measure_a_fresh_process_holding_the_saved_model(tmp_path) -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    out = tmp_path / "decode.json"
    done = decode("--rss-only", "--contenders", "nmfx", "nmfx-load", "nmfx-mmap", "dense-load",
                  out=out)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(out.read_text())["results"][0]["peak_rss"]
    assert set(rss) == {"nmfx", "nmfx-load", "nmfx-mmap", "dense-load"}, done.stdout
    # each child records its RSS after every step, in order
    built = rss["nmfx"]["stages_mb"]
    assert list(built) == ["imported", "built", "sparsified", "finalized", "prepared", "trimmed"]
    assert list(rss["nmfx-load"]["stages_mb"]) == ["imported", "loaded", "trimmed"]
    assert built["sparsified"] > built["built"] > built["imported"] > 0  # masks, weights
    assert rss["nmfx"]["build_peak_rss_mb"] >= built["sparsified"]
    lowered, dense = rss["nmfx-load"], rss["dense-load"]
    assert rss["nmfx-mmap"]["mmap"] and not lowered["mmap"]  # the same saved model, mmap'd
    assert rss["nmfx-mmap"]["weights_mb"] == lowered["weights_mb"]
    # the lowered model came back packed: its MLP's three 512x1024 weights are about halved
    assert lowered["weights_mb"] < dense["weights_mb"] - 2.5
    assert lowered["nmfx_imported"] and not dense["nmfx_imported"]
    assert dense["peak_rss_mb"] > dense["weights_mb"] and lowered["peak_rss_mb"] > 0
    assert list(tmp_path.iterdir()) == [out]  # the saved models were removed


def test_load_contenders_are_refused_in_a_timed_run(capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import decode as bench

    with pytest.raises(SystemExit) as exc:
        bench.parse([*TINY, "--contenders", "dense", "nmfx-load"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nmfx-load" in err and "--rss-only" in err
    assert bench.parse([*TINY, "--rss-only", "--contenders", "dense", "nmfx-load"]).rss_only

"""The accuracy study (benchmarks/accuracy) end to end at CI size: one seed, tiny models.

Checks what the full study's claims rest on: the JSON holds every method x pattern run;
sparse runs keep exactly N of M after ``nmfx.finalize`` (checked by nmfx's own API);
SAD is recorded per epoch and is 0 for the fixed mask; dense runs have no masks; SR-STE
and STE start from the same init; losses are finite; the renderer reads the JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.accuracy import render, run
from benchmarks.accuracy.tasks import SMOKE

PATTERNS = ("2:4", "4:8", "1:4")
METHODS = {"dense", "dense_half", "srste", "ste", "fixed"}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("accuracy") / "accuracy.json"
    argv = ["--smoke", "--seeds", "0", "--out", str(out), "--patterns", *PATTERNS]
    assert run.main(argv) == 0
    return json.loads(out.read_text())


def test_json_has_every_run_and_the_run_facts(study: dict) -> None:
    assert study["smoke"] is True
    assert study["settings"]["threads"] == 1
    assert study["settings"]["srste_lambda"] == pytest.approx(2e-4)
    assert set(study["tasks"]) == {"digits", "charlm"}
    for name, task in study["tasks"].items():
        assert {"spec", "data", "budget", "sparsity", "runs", "summary", "metric"} <= set(task)
        got = {(r["method"], r["pattern"]) for r in task["runs"]}
        want = {("dense", None), ("dense_half", None)} | {
            (m, p) for m in ("srste", "ste", "fixed") for p in PATTERNS
        }
        assert got == want, name
        assert {k.split("/")[0] for k in task["summary"] if "/" in k} == METHODS
        assert set(task["summary"]["paired_srste_minus_ste"]) == set(PATTERNS)
        for key in ("srste/2:4", "ste/2:4", "fixed/2:4"):
            entry = task["summary"][key]
            assert {"sad_total", "sad_second_half", "pruned_to_kept_abs_ratio"} <= set(entry)
            assert entry[task["metric"]]["n"] == 1
    corpus = study["tasks"]["charlm"]["data"]
    assert len(corpus["sha256"]) == 64 and corpus["python"]
    assert corpus["bytes"] == SMOKE["charlm"].corpus_bytes


def test_sparse_runs_are_exactly_nm_after_finalize(study: dict) -> None:
    for task in study["tasks"].values():
        for r in (r for r in task["runs"] if r["pattern"] is not None):
            n, m = map(int, r["pattern"].split(":"))
            c = r["checks"]
            assert c["mask_density"] == n / m  # every group keeps exactly N
            assert set(c["mask_density_per_layer"].values()) == {n / m}
            assert c["all_nm_after_finalize"] and c["detect_nm_matches"]
            assert c["nm_weights_after_finalize"] == c["planned_sparse_weights"]
            assert len(c["planned_sparse_weights"]) >= 1
            assert 0 < c["weight_density_after_finalize"] <= n / m
            assert c["max_metric_change_on_finalize"] < 1e-4


def test_sad_per_epoch_and_zero_for_the_fixed_mask(study: dict) -> None:
    for task in study["tasks"].values():
        for r in (r for r in task["runs"] if r["pattern"] is not None):
            sad = r["sad"]
            assert len(sad["vs_previous_epoch"]) == r["epochs"] == len(sad["vs_start"])
            assert len(sad["vs_final"]) == r["epochs"]
            assert sad["vs_final"][0] == sad["vs_start"][-1]  # start vs end, both ways
            if r["method"] == "fixed":
                assert sad["vs_previous_epoch"] == [0.0] * r["epochs"]
                assert sad["vs_start"] == [0.0] * r["epochs"]
                assert r["checks"]["mean_abs_pruned"] == 0.0  # zeroed, no gradient
            else:
                assert r["checks"]["mean_abs_pruned"] > 0.0  # STE keeps them training
                assert all(0.0 <= s <= 1.0 for s in sad["vs_previous_epoch"])
        # The dynamic masks of a from-scratch run move at least once somewhere.
        moving = [sum(r["sad"]["vs_previous_epoch"]) for r in task["runs"]
                  if r["method"] in ("srste", "ste")]  # fmt: skip
        assert max(moving) > 0


def test_dense_runs_have_no_masks_and_losses_are_finite(study: dict) -> None:
    for task in study["tasks"].values():
        for r in task["runs"]:
            if r["pattern"] is None:
                assert r["checks"] == {"masked_weights": 0, "sparsified": False}
                assert r["sad"] == {}
            assert all(math.isfinite(v) for v in r["final"].values())
            losses = [v for v in r["curve"]["train_loss"] if v is not None]
            assert len(losses) == r["epochs"] and all(math.isfinite(v) for v in losses)
            assert len(r["curve"]["epoch"]) == r["epochs"] + 1


def test_budgets_are_equal_and_srste_ste_share_their_start(study: dict) -> None:
    for task in study["tasks"].values():
        total = task["budget"]["total_epochs"]
        for r in task["runs"]:
            if r["method"] == "dense_half":
                continue
            assert r["epoch_offset"] + r["epochs"] == total, r["method"]
        by = {(r["method"], r["pattern"]): r for r in task["runs"]}
        for p in PATTERNS:
            srste, ste = by[("srste", p)], by[("ste", p)]
            assert srste["srste_lambda"] == pytest.approx(2e-4) and ste["srste_lambda"] == 0.0
            assert srste["curve"]["loss"][0] == ste["curve"]["loss"][0]  # same init, same mask
            assert by[("fixed", p)]["epoch_offset"] == by[("dense_half", None)]["epochs"]


def test_render_reads_the_json(study: dict, tmp_path: Path) -> None:
    src = tmp_path / "accuracy.json"
    src.write_text(json.dumps(study))
    written = render.render(src, tmp_path / "out", plots=False, ablations=(src,))
    text = written[0].read_text()
    assert "Sensitivity: SR-STE at larger lambda_W" in text
    assert "SR-STE" in text and "STE" in text and "fixed mask" in text
    rows = [line for line in text.splitlines() if line.startswith("| SR-STE ")]
    assert len(rows) == 2 * len(PATTERNS)  # one row per task and pattern

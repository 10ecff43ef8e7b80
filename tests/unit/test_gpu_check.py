"""The GPU check without a GPU: ``scripts/gpu_check.sh --dry-run`` end to end, its argument
errors, and the timed paths of ``benchmarks/gpu_linear.py`` and ``benchmarks/gpu_e2e.py`` run on
CPU with the semi-structured conversion and the CUDA timers faked, so that the one short run
on a GPU machine does not fail on a bug a CPU could have caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_e2e, gpu_linear
from nmfx.lowering import cuda

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"PYTHON": sys.executable}
    full_env |= env or {}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@no_gpu
def test_dry_run_exits_0_checks_what_a_cpu_can_and_says_what_it_skipped(tmp_path):
    proc = run_script("--dry-run", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["verified_on_hardware"] is False
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"install": "skipped", "pytest": "skipped", "gpu_linear": "ok",
                      "gpu_e2e": "ok", "tensorrt": "skipped"}  # fmt: skip
    skipped = "\n".join(summary["skipped"])
    assert "pytest: dry run: no GPU" in skipped and "timings" in skipped
    assert "DRY RUN (no GPU: nothing verified on hardware)" in (tmp_path / "summary.txt").read_text()
    linear = json.loads((tmp_path / "gpu_linear.json").read_text())
    assert len(linear["constraints"]) == 18 and all(c["agree"] for c in linear["constraints"])
    assert len(linear["layout"]) == 6  # in_features 4096 and 11008 x fp16, bf16, int8
    assert all(r["roundtrip_exact"] and r["values_in_order"] and r["meta_ok"]
               for r in linear["layout"])  # fmt: skip
    e2e = json.loads((tmp_path / "gpu_e2e.json").read_text())
    assert e2e["lowering"]["sparse"] == e2e["lowering"]["n_weights"] == 14  # 2 layers x 7
    assert e2e["greedy_check"]["agree"] is True
    assert all(r["fp16"] == "ok" for r in e2e["shapes"])


@no_gpu
def test_real_run_without_a_gpu_says_so(tmp_path):
    proc = run_script(str(tmp_path))
    assert proc.returncode == 2 and "no CUDA device here; run with --dry-run" in proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [(["--bogus"], "unknown option --bogus"), ([], "no output directory: pass one or set OUT")],
    ids=["unknown-option", "no-outdir"],
)
def test_bad_arguments_exit_2(args, message):
    proc = run_script(*args)
    assert proc.returncode == 2 and message in proc.stderr


def test_gpu_linear_degrades_when_nmfx_cannot_import(tmp_path):
    """A GPU image without one of nmfx's dependencies still gets the torch-only parts, and the
    output says what was skipped and why."""
    shim = tmp_path / "shim"
    shim.mkdir()
    # nmfx imports its optional pieces (tabulate, networkx) lazily, so a missing one no longer
    # stops `import nmfx`; an import that fails is simulated at interpreter start instead.
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoNmfx:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nmfx':\n"
        "            raise ImportError('no tabulate here')\n"
        "sys.meta_path.insert(0, NoNmfx())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(ROOT)])
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_linear.py", "--dry-run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    payload = json.loads((tmp_path / "gpu_linear.json").read_text())
    assert any("nmfx does not import (ImportError: no tabulate here)" in s
               for s in payload["skipped"])  # fmt: skip
    assert payload["layout"] and all(r["roundtrip_exact"] for r in payload["layout"])


# ---- the timed paths on CPU, kernels and timers faked -------------------------------------


class FakeSparse(torch.Tensor):
    """A dense copy standing in for a semi-structured weight; F.linear outputs keep the type."""

    @staticmethod
    def __new__(cls, w: torch.Tensor) -> FakeSparse:
        return torch.Tensor._make_subclass(cls, w.detach().clone())


def fake_medians(fns, **_):
    for fn in fns.values():
        fn()
    return {name: 1.0 if name == "dense" else 0.5 for name in fns}


def fake_layer_timer(fn):
    """Sparse loses at decode (2x dense's time), wins from 64 rows (half), as reported."""
    out = fn()
    if not isinstance(out, FakeSparse):
        return 1.0
    return 2.0 if out.numel() // out.shape[-1] < 64 else 0.5


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", FakeSparse)
    monkeypatch.setattr(cuda, "_check_device", lambda weights, backend: None)
    monkeypatch.setattr(cuda, "_time_ms", fake_layer_timer)
    for mod in (gpu_linear, gpu_e2e):
        monkeypatch.setattr(mod, "DEVICE", "cpu")
        monkeypatch.setattr(mod, "cuda_medians", fake_medians)


def test_gpu_linear_timed_path_on_cpu(fake_gpu, monkeypatch, tmp_path):
    plan = {"shapes": [(64, 128)], "rows": [1, 16, 256], "dtypes": ["fp16", "int8"],
            "backends": ["cusparselt", "cutlass"]}  # fmt: skip
    monkeypatch.setattr(gpu_linear, "plan", lambda quick: plan)
    args = SimpleNamespace(quick=False, dry_run=False, budget_s=60.0)
    payload = gpu_linear.run(args)
    assert payload["errors"] == []
    fp16 = [c for c in payload["raw"] if c["dtype"] == "fp16"]
    assert len(fp16) == 6 and all(c["speedup"] == 2.0 and c["err"] < 1e-3 for c in fp16)
    disp = {(c["backend"], c["rows"]): c for c in payload["dispatcher"]}
    assert len(disp) == 6  # int8 is not lowered (no dense int8 nn.Linear on GPU)
    assert [disp["cutlass", r]["choice"] for r in (1, 16, 256)] == ["dense", "dense", "sparse"]
    assert all(c["lowered_vs_dense"] == 2.0 for c in disp.values())
    assert payload["headline"]["lowered_vs_dense_min"] == 2.0
    text = gpu_linear.render(payload)
    assert "lower('cuda') per rows bucket" in text and "64x128" in text
    gpu_linear.write(tmp_path, "gpu_linear", payload, text)
    assert json.loads((tmp_path / "gpu_linear.json").read_text())["plan"]["rows"] == [1, 16, 256]


def test_gpu_e2e_timed_path_on_cpu(fake_gpu, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(gpu_e2e, "GPU_SIZES", gpu_e2e.SMALL)
    args = gpu_e2e.parse_args(["--out", "unused", "--layers", "1", "--prefill", "16",
                               "--decode-tokens", "3", "--backend", "cutlass",
                               "--budget-s", "3600"])  # fmt: skip
    payload = {"env": {}, "skipped": [], "errors": []}
    gpu_e2e.gpu_run(args, payload)
    low = payload["lowering"]
    assert (low["n_weights"], low["sparse"], low["per_call"], low["dense"]) == (7, 0, 7, 0)
    assert payload["prefill"][0]["speedup"] == 2.0
    assert payload["decode"]["greedy_identical"] is True  # FakeSparse computes exactly dense
    assert payload["accuracy"]["logits_rel_err"] < 1e-2
    assert payload["headline"]["target_prefill_1_15x_met"] is True


def test_gpu_linear_refuses_an_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write there"):
        gpu_linear.main(["--out", str(blocker / "sub"), "--dry-run"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

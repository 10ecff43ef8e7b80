"""nmfx.report and the nmfx command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import nmfx
from nmfx.reporting import SCHEMA_VERSION, Report, report


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 512)  # N:M, but too small to pay on CPU: stays nn.Linear
        self.c = nn.Linear(512, 1024)  # N:M and packed
        self.odd = nn.Linear(1024, 30)  # 30 outputs is fine; its input 1024 is divisible
        self.b = nn.Linear(30, 64)  # in_features=30: stays dense
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        h = torch.relu(self.c(torch.relu(self.a(x))))
        return self.head(torch.relu(self.b(torch.relu(self.odd(h)))))


@pytest.fixture(scope="module")
def tiny_report() -> tuple[Report, nn.Module]:
    torch.manual_seed(0)
    model = nmfx.sparsify(Tiny())
    return report(model, torch.randn(2, 64), repeats=3, warmup=1), model


def test_every_weight_layer_has_a_row_matching_the_plan(tiny_report):
    rep, model = tiny_report
    plan = {c.name: c for c in nmfx.summary(model).candidates}
    assert [r.name for r in rep.rows] == list(plan)
    assert {r.name for r in rep.rows if r.verdict == "sparse"} == {"c"}
    for row in rep.rows:
        if plan[row.name].sparse and row.name in ("a", "odd"):  # N:M, below the CPU size floor
            assert row.verdict == "dense" and "measured slower than dense" in row.reason
            assert row.pattern == "2:4" and row.dense_ms > 0 and row.sparse_ms is None
        elif plan[row.name].sparse:
            assert row.verdict == "sparse" and row.pattern == "2:4"
            assert row.dense_ms > 0 and row.sparse_ms > 0
            assert row.speedup == pytest.approx(row.dense_ms / row.sparse_ms)
            assert row.max_abs_diff < 1e-4
            assert row.sparse_bytes < row.dense_bytes
        else:
            assert row.verdict == "dense" and row.reason == plan[row.name].reason
            assert row.sparse_ms is None and row.speedup is None
    reasons = {r.name: r.reason for r in rep.rows}
    assert "in_features=30 is not a multiple of M=4" in reasons["b"]
    assert "produces the model output" in reasons["head"]


def test_totals_are_measured_and_consistent(tiny_report):
    rep, _ = tiny_report
    t = rep.totals
    assert (
        t.dense_ms > 0 and t.sparse_ms > 0 and t.speedup == pytest.approx(t.dense_ms / t.sparse_ms)
    )
    assert 0 < t.sparse_layer_share <= 1
    assert t.memory_saved_bytes == sum(r.dense_bytes - r.sparse_bytes for r in rep.rows) > 0
    assert rep.machine["torch"] == torch.__version__ and rep.machine["threads"] >= 1


def test_json_round_trips_through_the_schema(tiny_report):
    rep, _ = tiny_report
    text = rep.to_json()
    data = json.loads(text)
    assert data["schema_version"] == SCHEMA_VERSION
    assert {"rows", "totals", "machine", "settings", "target"} <= set(data)
    assert Report.from_json(text).to_json() == text
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="schema_version"):
        Report.from_json(json.dumps(data))


def test_renderers(tiny_report, tmp_path):
    rep, _ = tiny_report
    text = str(rep)
    assert "end to end (measured, not summed)" in text and "in_features=30" in text
    assert rep.to_markdown().count("|") > 20
    csv_lines = rep.to_csv().splitlines()
    assert csv_lines[0].startswith("name,param,op") and len(csv_lines) == len(rep.rows) + 1
    path = rep.plot(str(tmp_path / "s.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_dense_model_prunes_a_copy_and_says_so():
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = report(model, torch.randn(1, 64), repeats=2, warmup=1)
    assert any("pruned one-shot" in n for n in rep.notes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def nmfx_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nmfx.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_help_explains_every_subcommand():
    result = nmfx_cli("--help")
    assert result.returncode == 0
    for cmd in ("demo", "report", "inspect", "bench"):
        assert cmd in result.stdout
    sub = nmfx_cli("report", "--help")
    assert sub.returncode == 0 and "--pattern" in sub.stdout and "--json" in sub.stdout


def test_cli_inspect():
    result = nmfx_cli("inspect", "resnet18")
    assert result.returncode == 0, result.stderr
    assert "in_channels=3 is not a multiple of M=4" in result.stdout


def test_cli_report_writes_json(tmp_path):
    out = tmp_path / "r.json"
    result = nmfx_cli("report", "mlp", "--set", "hidden=256", "--repeats", "2", "--warmup", "1",
                      "--json", str(out), "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["schema_version"] == SCHEMA_VERSION
    assert "end to end" in result.stdout


def test_cli_demo_short(tmp_path):
    result = nmfx_cli(
        "demo", "--steps", "3", "--epochs", "1", "--repeats", "2", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "digits test accuracy" in result.stdout and "end to end" in result.stdout
    assert (tmp_path / "report.json").exists() and (tmp_path / "speedup.png").exists()


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["report", "resnet19"], 2, "did you mean 'resnet18'"),
        (["report", "mlp", "--pattern", "3:2"], 1, "0 < N < M"),
        (["inspect", "mlp", "--set", "hidden"], 2, "KEY=VALUE"),
        (["report", "mlp", "--target", "tpu"], 2, "invalid choice"),
        (["frobnicate"], 2, "invalid choice"),
        (
            ["report", "llama", "--seq", "256"],
            2,
            "--seq 256 is longer than llama's max_seq_len=128; pass --seq 128 or less, "
            "or --set max_seq_len=256",
        ),
        (["report", "gpt2", "--seq", "200"], 2, "gpt2's n_positions=128"),
    ],
    ids=[
        "unknown-model",
        "bad-pattern",
        "bad-set",
        "bad-target",
        "bad-command",
        "seq-llama",
        "seq-gpt2",
    ],
)
def test_cli_bad_arguments_exit_nonzero_with_message(args, code, message):
    result = nmfx_cli(*args)
    assert result.returncode == code
    assert message in result.stderr

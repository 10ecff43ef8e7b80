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
        self.a = nn.Linear(64, 512)  # N:M and packed (small: no size floor, tuned per bucket)
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
    # Module-scoped, so set up before the suite's function-scoped NMFX_CALIBRATE=0: without
    # it the verdicts would depend on this host's timings (a small layer whose lowered call
    # measured slower stays nn.Linear; every layer did on the portable kernel).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NMFX_CALIBRATE", "0")
        return report(model, torch.randn(2, 64), repeats=3, warmup=1), model


def test_every_weight_layer_has_a_row_matching_the_plan(tiny_report):
    rep, model = tiny_report
    plan = {c.name: c for c in nmfx.summary(model).candidates}
    assert [r.name for r in rep.rows] == list(plan)
    assert {r.name for r in rep.rows if r.verdict == "sparse"} == {"a", "c", "odd"}
    for row in rep.rows:
        if plan[row.name].sparse:
            assert row.verdict == "sparse" and row.pattern == "2:4"
            assert "rows of x; ran " in row.reason and row.reason.endswith(" at 2 rows of x")
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
    assert result.stdout.startswith("training plan (what nmfx.sparsify makes N:M")


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
    # the kernels are built/loaded before training is timed (a first build took 35 s)
    assert result.stdout.index("CPU kernels") < result.stdout.index("digits test accuracy")
    assert (tmp_path / "report.json").exists() and (tmp_path / "speedup.png").exists()


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["report", "resnet19"], 2, "did you mean 'resnet18'"),
        (["report", "mlp", "--pattern", "3:2"], 2, "nmfx: error: --pattern '3:2': pattern 3:2 is invalid"),
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


def _usage_error(capsys, *args: str) -> str:
    """Run ``nmfx *args`` in this process; it must exit 2 with ``nmfx: error:``."""
    from nmfx.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith("nmfx: error: "), err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "llama", "--seq", "-3"], "--seq -3 is not allowed: --seq counts tokens per sequence and must be an integer >= 1"),
        (["report", "llama", "--seq", "0"], "--seq 0 is not allowed"),
        (["report", "mlp", "--batch", "0"], "--batch 0 is not allowed: --batch counts rows of the example input"),
        (["report", "mlp", "--batch", "-1"], "--batch -1 is not allowed"),
        (["report", "mlp", "--repeats", "0"], "--repeats 0 is not allowed: --repeats counts timed repeats and must be an integer >= 1"),
        (["report", "mlp", "--warmup", "-1"], "--warmup -1 is not allowed: --warmup counts untimed runs and must be an integer >= 0"),
        (["report", "mlp", "--input-shape", "1x0"], "--input-shape '1x0' must be positive sizes joined by 'x'"),
        (["bench", "--shape", "0x0"], "--shape '0x0' must be positive sizes joined by 'x', e.g. --shape 4096x4096"),
        (["bench", "--shape", "16x16x16"], "--shape '16x16x16' must be OUTxIN"),
        (["bench", "--batch", "1", "0"], "--batch 0 is not allowed"),
        (["demo", "--epochs", "0"], "--epochs 0 is not allowed"),
        (["inspect", "mlp", "--pattern", "abc"], "--pattern 'abc': pattern 'abc' is not of the form 'N:M'"),
        (["report", "mlp", "--pattern", "5:4"], "--pattern '5:4': pattern 5:4 is invalid: need 0 < N < M"),
    ],
    ids=["seq-negative", "seq-zero", "batch-zero", "batch-negative", "repeats-zero", "warmup-negative",
         "input-shape-zero", "bench-shape-0x0", "bench-shape-3d", "bench-batch-zero", "epochs-zero",
         "inspect-pattern", "report-pattern"],
)  # fmt: skip
def test_bad_numbers_and_patterns_exit_2_before_any_work(capsys, monkeypatch, args, message):
    import model_zoo

    monkeypatch.setattr(model_zoo, "build", lambda *a, **k: pytest.fail("built a model"))
    assert message in _usage_error(capsys, *args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "mlp", "--json", "{tmp}/missing/r.json"], "--json {tmp}/missing/r.json: folder {tmp}/missing does not exist"),
        (["report", "mlp", "--csv", "{tmp}"], "--csv {tmp}: is a directory; give a file path"),
        (["report", "mlp", "--markdown", "/proc/nmfx-r.md"], "--markdown /proc/nmfx-r.md: cannot write there"),
        (["demo", "--out", "{tmp}/afile/sub"], "--out {tmp}/afile/sub: cannot create or write this folder (Not a directory)"),
        (["demo", "--out", "/proc/nmfx-demo"], "--out /proc/nmfx-demo: cannot create or write this folder"),
    ],
    ids=["json-missing-dir", "csv-is-a-dir", "markdown-read-only", "demo-out-under-a-file", "demo-out-read-only"],
)  # fmt: skip
def test_output_paths_are_checked_before_any_work(capsys, monkeypatch, tmp_path, args, message):
    import model_zoo

    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(model_zoo, "build", lambda *a, **k: pytest.fail("built a model"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert message.replace("{tmp}", str(tmp_path)) in _usage_error(capsys, *args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing left behind


def test_bench_prints_the_dispatch_table_only_with_verbose(capsys):
    from nmfx.cli import main

    bench = ["bench", "--shape", "8x16", "--batch", "1", "--repeats", "1"]
    for argv, shown in ((bench, False), (["-v", *bench], True), ([*bench, "-v"], True)):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert ("dispatch table" in out) == shown
        assert "8x16 2:4 fp32 batch 1" in out


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"repeats": 0}, ValueError, r"report\(repeats=0\): repeats must be an int >= 1"),
        ({"warmup": -1}, ValueError, r"report\(warmup=-1\): warmup must be an int >= 0"),
        ({"repeats": 2.5}, ValueError, r"report\(repeats=2\.5\)"),
    ],
    ids=["repeats-zero", "warmup-negative", "repeats-float"],
)
def test_report_rejects_bad_counts(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        report(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), torch.randn(1, 16), **kwargs)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x, y):
        return self.head(self.fc(x) + y)


def test_report_takes_a_list_as_positional_inputs_and_refuses_a_dict():
    torch.manual_seed(0)
    model, x, y = TwoInputs(), torch.randn(1, 64), torch.randn(1, 64)
    rep = report(model, [x, y], repeats=1, warmup=0)
    assert rep.settings["input_shapes"] == [[1, 64], [1, 64]]
    with pytest.raises(TypeError, match=r"example_inputs=dict\): keyword inputs are not supported; "
                       r"pass the positional inputs as a tuple \(x,\) or a list \[x\]"):  # fmt: skip
        report(model, {"x": x, "y": y})


def test_version(capsys):
    from nmfx import __version__
    from nmfx.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nmfx {__version__}"


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 64)
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, vocab)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


def tiny_lm(vocab: int = 50) -> nn.Module:
    return TinyLM(vocab)


def test_token_model_from_module_callable_with_an_integer_input_dtype(capsys):
    from nmfx.cli import main

    spec = f"{__name__}:tiny_lm"  # importable as this module (PYTHONPATH holds the repo root)
    argv = ["report", spec, "--input-shape", "2x8", "--input-dtype", "int64", "--repeats", "1",
            "--warmup", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "end to end" in capsys.readouterr().out

"""Per-layer autotuning: what is timed, the per-bucket choice, the disk cache and its bad inputs,
overrides, and the choice travelling with a lowered module. No test depends on which path wins
on this host: timings are stubbed where a choice is asserted."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import nmfx.kernels as K
from nmfx.kernels import _autotune, _build, _callcost, _dispatch
from nmfx.lowering.cpu import NMLinear
from nmfx.packed import pack

KEY = _autotune.shape_key(24, 64, torch.float32, 2, 4)


def random_nm(rows: int, cols: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols // m, m, generator=g)
    idx = w.abs().topk(n, dim=-1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx)).reshape(rows, cols)


@pytest.fixture(autouse=True)
def _tuning(monkeypatch, tmp_path):
    """Tuning on, into a private cache; no memory of earlier tests; idle probe and machine;
    a fixed call overhead of the lowered module (5 us)."""
    assert K.kernels_available()
    monkeypatch.setenv("NMFX_CALIBRATE", "1")
    monkeypatch.setenv("NMFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NMFX_DISPATCH", raising=False)
    monkeypatch.delenv("NMFX_ISA", raising=False)
    monkeypatch.setattr(_autotune, "_contention_probe_us", lambda: 40.0)
    monkeypatch.setattr(_autotune, "_load_monitor", lambda: FakeLoad(0.01))
    monkeypatch.setattr(_callcost, "_overhead", [0.005])
    monkeypatch.setattr(_autotune, "_warned", set())
    monkeypatch.setattr(_dispatch, "_table", None)
    _autotune.clear_memory()
    yield
    _autotune.clear_memory()


class FakeLoad:
    """A LoadMonitor reporting that other processes took ``share`` of the CPU."""

    def __init__(self, share: float) -> None:
        self.others_share = share
        self.contended = share > 0.10

    def __enter__(self) -> FakeLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _stub_timer(monkeypatch, times_by_batch, duel_times=None) -> list[tuple[int, list[str]]]:
    """Replace the timing: ``times_by_batch(rows_x, choice) -> seconds`` for the rounds and
    ``duel_times`` (default: the same) for a near tie's paired duel; records the calls (a duel
    as ``(rows_x, ["duel", first, second])``)."""
    calls: list[tuple[int, list[str]]] = []
    duel_times = duel_times or times_by_batch

    def fake(fns):
        rows_x = fake.rows_x.pop(0)
        fake.now = rows_x
        calls.append((rows_x, list(fns)))
        return {c: times_by_batch(rows_x, c) for c in fns}

    def fake_duel(fns, first, second):
        assert first in fns and second in fns
        calls.append((fake.now, ["duel", first, second]))
        return duel_times(fake.now, first) / duel_times(fake.now, second), 6

    fake.rows_x = list(_autotune.PROBE_ROWS)
    monkeypatch.setattr(_autotune, "_time_bucket", fake)
    monkeypatch.setattr(_autotune, "_duel", fake_duel)
    return calls


def _timed(calls: list[tuple[int, list[str]]]) -> list[tuple[int, list[str]]]:
    """The calls of the interleaved rounds (no duels)."""
    return [(rows, cands) for rows, cands in calls if cands[0] != "duel"]


def test_every_bucket_and_every_host_choice_is_timed_without_early_stop(monkeypatch) -> None:
    """Sparse loses at 2 rows and wins again at 4 (non-monotone): later buckets are still
    measured and chosen on their own times."""

    def times(rows_x, choice):
        if choice == "dense":
            return 1.0
        return 2.0 if rows_x == 2 else 0.5

    stub = _stub_timer(monkeypatch, times)
    entry = _autotune.measure(KEY)
    calls = _timed(stub)
    assert [rows for rows, _ in calls] == list(_autotune.PROBE_ROWS)
    assert set(calls[0][1]) == {*_autotune.host_choices(2, 4, 1), _autotune.LINEAR_REF}
    # The F.linear reference (timed like a sparse path here), never a choice.
    assert entry["linear_ms"] == [2000.0 if r == 2 else 500.0 for r in _autotune.PROBE_ROWS]
    assert calls[0][1].count("dense") == 1
    assert entry["choices"][1] == "dense"
    assert all(c != "dense" for i, c in enumerate(entry["choices"]) if i != 1)
    if "avx2" in _build.supported_isas():
        assert "avx2-select" in calls[0][1] and all("avx2-select" not in c for _, c in calls[1:])


def test_noise_margin_keeps_the_previous_winner_and_slow_paths_are_pruned(monkeypatch) -> None:
    if "avx2" not in _build.supported_isas():
        pytest.skip("needs two sparse paths")

    def times(rows_x, choice):
        base = {"dense": 1.0, "portable": 10.0, "avx2-expand": 0.50, "avx2-panels": 0.51}
        if rows_x == 1:
            base["avx2-panels"] = 5.0  # batched paths lose by far at one row...
        if rows_x >= 64:
            base["avx2-panels"] = 0.49  # ...and come back: within 3%, avx2-expand stays
        if rows_x >= 256:
            base["avx2-panels"] = 0.2
        return base.get(choice, 0.9)

    stub = _stub_timer(monkeypatch, times)
    entry = _autotune.measure(KEY)
    calls = _timed(stub)
    assert entry["choices"][6:] == ["avx2-expand"] * 2 + ["avx2-panels"] * 2
    assert all("portable" not in cands for _, cands in calls[1:])  # > 3x the best at 1 row
    assert all("dense" in cands and "avx2-panels" in cands for _, cands in calls)


def _runner_up() -> str:
    """A sparse choice this host offers at every probe batch (the second of a near tie)."""
    return next(c for c in _autotune.host_choices(2, 4, 512) if c != "dense")


def test_near_tie_is_settled_by_the_paired_duel(monkeypatch) -> None:
    """Dense is fastest by its rounds' minimum at one row but within NEAR_TIE of a sparse path:
    the two are timed again and the duel's paired ratio (sparse 6% faster) decides. Far apart
    (256+ rows), no duel runs."""
    other = _runner_up()

    def times(rows_x, choice):
        if rows_x >= 256:
            return {"dense": 1.0, other: 2.0}.get(choice, 9.0)
        return {"dense": 1.0, other: 1.05}.get(choice, 9.0)

    def duel_times(rows_x, choice):
        return {"dense": 1.0, other: 0.94}[choice]

    calls = _stub_timer(monkeypatch, times, duel_times)
    entry = _autotune.measure(KEY)
    duels = [(rows, cands) for rows, cands in calls if cands[0] == "duel"]
    assert duels and all(cands == ["duel", "dense", other] for _, cands in duels)
    assert {rows for rows, _ in duels} == {r for r in _autotune.PROBE_ROWS if r < 256}
    assert entry["choices"][:8] == [other] * 8 and entry["choices"][8:] == ["dense"] * 2
    assert entry["duels"][0] == {"rows": 1, "pair": ["dense", other], "ratio": round(1 / 0.94, 4),
                                 "rounds": 6}  # fmt: skip


def test_each_close_candidate_duels_the_winner_so_far(monkeypatch) -> None:
    """Three candidates within NEAR_TIE by their fastest rounds: the fastest meets the second,
    the duel's winner meets the third; the last duel's winner is chosen. A fourth, 20% off,
    takes no part."""
    sparse = [c for c in _autotune.host_choices(2, 4, 1) if c != "dense"]
    if len(sparse) < 3:
        pytest.skip("needs three sparse paths at one row")
    a, b, far = sparse[:3]
    first = {"dense": 1.0, a: 1.02, b: 1.05, far: 1.2}
    paired = {"dense": 1.0, a: 0.97, b: 0.95, far: 0.5}
    calls = _stub_timer(monkeypatch, lambda rows, c: first.get(c, 9.0), lambda rows, c: paired[c])
    entry = _autotune.measure(KEY)
    assert [cands for rows, cands in calls if rows == 1 and cands[0] == "duel"] == [
        ["duel", "dense", a], ["duel", a, b]]  # fmt: skip
    assert entry["choices"][0] == b


def test_a_faster_median_challenges_a_lucky_fastest_round(monkeypatch) -> None:
    """Dense wins by its fastest round by far (30%), but a sparse path's median round is faster
    than dense's: the two duel, and the paired ratio decides. Without a faster median, no duel."""
    other = _runner_up()

    def fake(fns):
        fastest = {c: {"dense": 0.7, other: 1.0}.get(c, 9.0) for c in fns}
        medians = {c: {"dense": 1.3, other: 1.1 if fake.lucky else 1.4}.get(c, 9.0) for c in fns}
        return _autotune.Fastest(fastest, medians)

    duels = []

    def fake_duel(fns, first, second):
        duels.append((first, second))
        return 1.2, 6  # dense 20% slower, paired

    monkeypatch.setattr(_autotune, "_time_bucket", fake)
    monkeypatch.setattr(_autotune, "_duel", fake_duel)
    fake.lucky = True
    assert _autotune.measure(KEY)["choices"] == [other] * len(_autotune.BUCKETS)
    assert duels == [("dense", other)] * len(_autotune.BUCKETS)
    duels.clear()
    fake.lucky = False
    assert _autotune.measure(KEY)["choices"] == ["dense"] * len(_autotune.BUCKETS)
    assert duels == []


def test_time_bucket_reports_fastest_and_median_rounds(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_autotune, "time", clock)
    spent = iter([0.001] + [0.003, 0.002, 0.009, 0.002, 0.004] * 20)
    out = _autotune._time_bucket({"a": lambda: clock.spend(next(spent))()})
    assert out == {"a": 0.002} and out.medians == {"a": 0.003}


def test_duel_against_the_previous_winner_keeps_it_within_the_noise_margin(monkeypatch) -> None:
    """The previous bucket's winner meets this bucket's fastest in the duel: within
    NOISE_MARGIN (2% slower) it stays; 5% slower, it is replaced."""
    other = _runner_up()

    def times(rows_x, choice):
        if rows_x == 1:
            return {"dense": 1.0, other: 1.5}.get(choice, 9.0)
        return {"dense": 1.0, other: 0.97}.get(choice, 9.0)

    def duel_times(rows_x, choice):
        return {"dense": 1.0, other: 0.98 if rows_x < 64 else 0.95}[choice]

    _stub_timer(monkeypatch, times, duel_times)
    entry = _autotune.measure(KEY)
    assert entry["choices"][:6] == ["dense"] * 6
    assert entry["choices"][6:] == [other] * 4


class FakeClock:
    """perf_counter for :func:`_autotune._duel`: calls of the timed functions advance it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def spend(self, seconds: float):
        def fn() -> None:
            self.now += seconds

        return fn


def test_duel_takes_the_median_paired_ratio_within_its_budget(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_autotune, "time", clock)
    slow_once = iter([0.05] + [0.001] * 100)
    fns = {"a": clock.spend(0.001), "b": clock.spend(0.002),
           "c": lambda: clock.spend(next(slow_once))()}  # fmt: skip
    ratio, rounds = _autotune._duel(fns, "a", "b")
    assert ratio == pytest.approx(0.5)
    # 3 ms a round: past DUEL_MIN_ROUNDS until the budget is spent, at most DUEL_MAX_ROUNDS
    budget_rounds = int(_autotune.DUEL_BUDGET_S / 0.003) + 1
    assert rounds == min(max(_autotune.DUEL_MIN_ROUNDS, budget_rounds), _autotune.DUEL_MAX_ROUNDS)
    # one round slowed 50x (another process's time slice) does not move the median
    ratio, rounds = _autotune._duel(fns, "c", "a")
    assert ratio == pytest.approx(1.0)
    assert rounds == _autotune.DUEL_MIN_ROUNDS  # the slow round spent the budget


def test_cache_round_trip_and_memory(monkeypatch) -> None:
    calls = _stub_timer(monkeypatch, lambda rows_x, c: 0.5 if c == "dense" else 1.0)
    first = _autotune.autotune([KEY])[KEY]
    assert first["source"] == "measured" and first["choices"] == ["dense"] * 10
    path = _autotune.cache_path(_autotune.host_key())
    assert json.loads(path.read_text())["entries"][str(KEY)]["choices"] == ["dense"] * 10
    _autotune.clear_memory()
    monkeypatch.setattr(_autotune, "measure", lambda key: pytest.fail("measured again"))
    again = _autotune.autotune([KEY])[KEY]
    assert again["source"] == "cache" and again["choices"] == first["choices"]
    assert len(calls) == len(_autotune.PROBE_ROWS)


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"version": _autotune.TABLE_VERSION, "host": {"cpu": "elsewhere"}, "entries": {}}),
     json.dumps([1, 2]), ""],
    ids=["corrupt", "foreign-host", "not-a-table", "truncated"],
)
def test_bad_cache_file_warns_once_naming_it_and_is_rewritten(monkeypatch, content) -> None:
    _stub_timer(monkeypatch, lambda rows_x, c: 0.5 if c == "dense" else 1.0)
    path = _autotune.cache_path(_autotune.host_key())
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match=r"ignoring the autotuning cache .*autotune-v\d+-"):
        entry = _autotune.autotune([KEY])[KEY]
    assert entry["source"] == "measured"
    data = json.loads(path.read_text())
    assert data["host"] == _autotune.host_key() and str(KEY) in data["entries"]


def test_unwritable_cache_dir_works_and_warns_once(monkeypatch, tmp_path) -> None:
    _stub_timer(monkeypatch, lambda rows_x, c: 0.5 if c == "dense" else 1.0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("NMFX_CACHE_DIR", str(blocker / "sub"))  # a file in the way
    other = _autotune.shape_key(8, 16, torch.float32, 2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _autotune.autotune([KEY])[KEY]["choices"] == ["dense"] * 10
        monkeypatch.setattr(_autotune, "_time_bucket", lambda fns: dict.fromkeys(fns, 1.0))
        _autotune.autotune([other])
    msgs = [str(w.message) for w in caught if "cannot write the autotuning cache" in str(w.message)]
    assert len(msgs) == 1 and "NMFX_CACHE_DIR" in msgs[0]


@pytest.mark.parametrize(
    ("probe_us", "share"), [(8000.0, 0.01), (40.0, 0.45)], ids=["slow-parallel-op", "others-45%"]
)
def test_tuning_under_load_is_used_but_not_cached(monkeypatch, probe_us, share) -> None:
    _stub_timer(monkeypatch, lambda rows_x, c: 0.5 if c == "dense" else 1.0)
    monkeypatch.setattr(_autotune, "_contention_probe_us", lambda: probe_us)
    monkeypatch.setattr(_autotune, "_load_monitor", lambda: FakeLoad(share))
    entry = _autotune.autotune([KEY])[KEY]
    assert entry["source"] == "measured-contended" and entry["choices"] == ["dense"] * 10
    assert entry["load"] == {"others_cpu_share": share, "parallel_op_us": probe_us,
                             "contended": True}  # fmt: skip
    assert not _autotune.cache_path(_autotune.host_key()).exists()
    (phase,) = _autotune.table()["tuning_phases"]
    assert phase["shapes"] == 1 and phase["others_cpu_share"] == share and not phase["cached"]


def test_quiet_tuning_is_cached_with_its_load(monkeypatch) -> None:
    _stub_timer(monkeypatch, lambda rows_x, c: 0.5 if c == "dense" else 1.0)
    _autotune.autotune([KEY])
    stored = json.loads(_autotune.cache_path(_autotune.host_key()).read_text())
    assert stored["entries"][str(KEY)]["load"] == {
        "others_cpu_share": 0.01, "parallel_op_us": 40.0, "contended": False
    }  # fmt: skip
    assert _autotune.table()["tuning_phases"][0]["cached"] is True


def test_codes_and_buckets() -> None:
    choices = list(_autotune.CHOICES) * 2
    assert _autotune.decode(_autotune.encode(choices[:10])) == choices[:10]
    assert [_autotune.bucket_of(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 256, 257, 10**6)] \
        == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 8, 9, 9]  # fmt: skip
    code = _autotune.encode(["avx2-select", *["dense"] * 9])
    assert K.dispatch_summary(code) == "avx2-select at 1, dense at 2+ rows of x"


@pytest.mark.parametrize(
    ("env", "value", "match"),
    [
        ("NMFX_DISPATCH", "fast", r"NMFX_DISPATCH='fast' is not one of \['auto', 'sparse', 'dense'"),
        ("NMFX_ISA", "avx9", r"NMFX_ISA='avx9' is not one of \['auto', 'portable', 'avx2'"),
    ],
)
def test_invalid_overrides_name_the_value_and_the_allowed_ones(monkeypatch, env, value, match):
    p = pack(random_nm(8, 16, 2, 4), "2:4")
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=match):
        K.nm_linear(torch.randn(1, 16), p)


def _host_paths() -> list[str]:
    return [c for c in _autotune.CHOICES if _autotune.choice_isa(c) in (None, *K.available_isas())]


def _host_path_batches() -> list[tuple[str, int]]:
    """Every host choice at 1, 3 and 40 rows of x; the selecting GEMVs at one row only (their
    contract: forcing one at more rows is an error, see test_cpu_kernels.py)."""
    return [(c, b) for c in _host_paths() for b in (1, 3, 40) if b == 1 or not c.endswith("-select")]


@pytest.mark.parametrize(("choice", "batch"), _host_path_batches(), ids=lambda v: str(v))
def test_every_host_choice_forced_matches_linear(choice: str, batch: int) -> None:
    w = random_nm(40, 96, 2, 4, seed=3)
    x = torch.randn(batch, 96)
    with K.force_dispatch(choice):
        y = K.nm_linear(x, pack(w, "2:4"), None)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)


def _module() -> NMLinear:
    return NMLinear(pack(random_nm(24, 64, 2, 4, seed=4), "2:4"), torch.randn(24))


def test_choice_travels_with_the_module(monkeypatch, tmp_path) -> None:
    _stub_timer(monkeypatch, lambda rows_x, c: 0.5 if c == "dense" else 1.0)
    layer = _module()
    table = K.autotune([layer])
    assert table == {str(KEY): dict.fromkeys(_autotune.table()["buckets"], "dense")}
    code = layer.dispatch
    assert code == _autotune.encode(["dense"] * 10)
    assert K.path_for(layer, 7) == "dense"
    with K.force_dispatch("sparse"):
        assert K.path_for(layer, 7) == "sparse"
    assert copy.deepcopy(layer).dispatch == code
    torch.save(layer, tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=False).dispatch == code
    x = torch.randn(3, 64)
    ep = torch.export.export(layer, (x,))
    calls = [n for n in ep.graph.nodes if n.target is torch.ops.nmfx.nm_linear.default]
    assert len(calls) == 1 and code in calls[0].args
    torch.testing.assert_close(ep.module()(x), layer(x))


def test_table_naming_an_isa_this_cpu_lacks_runs_a_supported_path(monkeypatch) -> None:
    layer = _module()
    layer.dispatch = _autotune.encode(["avx512-panels"] * 10)
    x = torch.randn(2, 64)
    # A CPU with the portable path only, as the kernels (the C++ op's choice table too) see it.
    with (
        K.use_isa_cap("portable"),
        pytest.warns(RuntimeWarning, match=r"names 'avx512-panels', which this CPU cannot run"),
    ):
        y = layer(x)
    w = random_nm(24, 64, 2, 4, seed=4)
    torch.testing.assert_close(y, F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-4)


def test_lowering_tunes_small_layers_too(monkeypatch) -> None:
    """No size floor: a 64x64 N:M layer is packed and runs where it measured fastest."""
    import nmfx

    _stub_timer(monkeypatch, lambda rows_x, c: 0.5 if c == "dense" else 1.0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    low = nmfx.lower(nmfx.finalize(nmfx.sparsify(model)), "cpu")
    assert isinstance(low[0], NMLinear)
    assert low[0].dispatch == _autotune.encode(["dense"] * 10)


def _times(linear: float, best: float, win_at: int | None = None):
    """Stub timings (s): F.linear ``linear``, the best sparse path ``best`` (or 0.1x F.linear at
    the probe batch ``win_at``), dense branch and the other paths slower."""

    def times(rows_x: int, choice: str) -> float:
        if choice == _autotune.LINEAR_REF:
            return linear
        if choice == "portable":
            return best * (0.1 * linear / best if rows_x == win_at else 1.0)
        return 3 * linear

    return times


@pytest.mark.parametrize(
    ("times", "kept"),
    [
        (_times(10e-6, 6e-6), True),  # kernel 6 us + 5 us overhead vs 10 us: dense everywhere
        (_times(10e-6, 6e-6, win_at=64), False),  # ...but wins at one bucket: lowered
        (_times(10e-6, 4e-6), False),  # 4 + 5 < 10 * 0.97: lowered
    ],
    ids=["loses-everywhere", "wins-at-64-rows", "wins-with-overhead"],
)
def test_small_layer_stays_nn_linear_where_its_call_measured_slower(monkeypatch, times, kept):
    """The decision follows the (injected) timings and call overhead, not this host's speed."""
    import nmfx

    _stub_timer(monkeypatch, times)
    model = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 4))
    low = nmfx.lower(nmfx.finalize(nmfx.sparsify(model)), "cpu")
    (decision,) = [d for d in nmfx.lowering_decisions(low) if d.param == "0.weight"]
    assert isinstance(low[0], torch.nn.Linear) is kept
    assert isinstance(low[0], NMLinear) is not kept
    assert ("kept as nn.Linear" in decision.reason) is kept
    if kept:
        assert decision.verdict == "dense" and "5.0 us of it the lowered call's" in decision.reason
        x = torch.randn(2, 64)
        torch.testing.assert_close(low(x), model(x))


def test_dense_call_rule_needs_the_f_linear_reference(monkeypatch) -> None:
    """Large layers are not timed as F.linear (their call overhead cannot matter) and stay
    lowered; a forced dispatch mode or no tuning turns the rule off."""
    calls = _stub_timer(monkeypatch, _times(10e-6, 9e-6))
    big = _autotune.shape_key(2048, 1024, torch.float32, 2, 4)  # 8 MiB dense
    assert "linear_ms" not in _autotune.measure(big)
    assert all(_autotune.LINEAR_REF not in names for _, names in calls)
    p = pack(random_nm(24, 64, 2, 4), "2:4")
    monkeypatch.setattr(_autotune, "_time_bucket", lambda fns: {c: _times(10e-6, 9e-6)(1, c) for c in fns})
    assert K.dense_call_reason(p) is not None
    monkeypatch.setenv("NMFX_DISPATCH", "sparse")
    assert K.dense_call_reason(p) is None
    monkeypatch.setenv("NMFX_DISPATCH", "auto")
    monkeypatch.setenv("NMFX_CALIBRATE", "0")
    assert K.dense_call_reason(p) is None


def test_dense_call_reason_rule() -> None:
    entry = {"choices": ["avx2-expand", "dense"], "ms": [{"avx2-expand": 0.006, "dense": 0.02},
             {"avx2-expand": 0.03, "dense": 0.012}], "linear_ms": [0.0105, 0.0170]}  # fmt: skip
    assert _callcost.dense_call_reason(entry, 0.005) is not None  # 11 >= 10.5, 17 >= 17
    assert _callcost.dense_call_reason(entry, 0.004) is None  # 10 * 1.03 < 10.5 at 1 row
    assert _callcost.dense_call_reason({**entry, "linear_ms": []}, 0.005) is None


def test_module_call_overhead_is_measured_once_per_process(monkeypatch) -> None:
    monkeypatch.setattr(_callcost, "_overhead", [])
    monkeypatch.setattr(_callcost, "OVERHEAD_ROUNDS", 20)
    first = _callcost.module_call_overhead_ms()
    assert 0.0 <= first < 10.0  # ms; a lowered call is never 10 ms slower than nn.Linear's
    monkeypatch.setattr(_callcost, "_measure_overhead_ms", lambda: pytest.fail("measured again"))
    assert _callcost.module_call_overhead_ms() == first

"""Contention detection: the report says when other processes loaded the CPU it measured on."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from nmfx.reporting import measure
from nmfx.reporting.render import render_text
from nmfx.reporting.timing import CONTENDED_SHARE, LoadMonitor


def test_a_busy_process_beside_the_measurement_is_seen_as_contention():
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # let it start spinning
        with LoadMonitor() as load:
            end = time.perf_counter() + 1.0
            while time.perf_counter() < end:
                time.sleep(0.01)  # this process idles; the busy one holds a core
    finally:
        busy.kill()
        busy.wait()
    share = load.others_share
    assert share is not None and share > CONTENDED_SHARE, load.result
    assert load.contended


def test_an_idle_wait_is_not_contention_by_this_process():
    with LoadMonitor() as load:
        torch.randn(256, 256) @ torch.randn(256, 256)  # our own work never counts as others'
    assert load.result["own_cpu_share"] >= 0
    assert "parallel_op_us_after" in load.result


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.head = nn.Linear(128, 8)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)))


@pytest.mark.parametrize("contended", [False, True], ids=["quiet", "contended"])
def test_report_notes_contention_and_records_the_load(monkeypatch, contended):
    monkeypatch.setattr(LoadMonitor, "contended", property(lambda self: contended))
    monkeypatch.setattr(LoadMonitor, "others_share", property(lambda self: 0.42))
    rep = measure.report(Two(), torch.randn(1, 64), repeats=2, warmup=1)
    assert "parallel_op_us_before" in rep.machine["load"]
    text = render_text(rep)
    if contended:
        assert any("contention" in n and "42%" in n for n in rep.notes)
        assert "measured under contention" in text
    else:
        assert not any("contention" in n for n in rep.notes)
        assert "contention" not in text

"""``benchmarks/decode.py --split``: the prefill / per-token figures the README quotes come
from this arithmetic over the interleaved rounds."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
decode = importlib.import_module("decode")


def test_split_pairs_each_round_and_skips_unsplit_contenders():
    seconds = {
        "nmfx": [1.0, 1.2, 3.0],  # 32 new tokens
        "nmfx" + decode.PREFILL: [0.08, 0.9, 0.07],  # 1 new token, same rounds
        "dense": [2.0, 2.0, 2.0],  # no 1-token run: not split
    }
    out = decode._split(seconds, new=32)
    assert set(out) == {"nmfx"}
    # per round (1.0-0.08, 1.2-0.9, 3.0-0.07) / 31: median 0.92 / 31, not the difference of
    # the medians (1.2 - 0.08) / 31
    assert out["nmfx"]["per_token_ms"] == pytest.approx(0.92 / 31 * 1e3, abs=1e-3)
    assert out["nmfx"]["prefill_ms"] == pytest.approx(80.0)
    assert out["nmfx"]["prefill_share"] == pytest.approx(0.08 / 1.2, abs=1e-3)


def test_split_needs_two_new_tokens():
    assert decode._split({"a": [1.0], "a" + decode.PREFILL: [0.5]}, new=1) == {}


def test_split_flag_parses():
    assert decode.parse(["--split"]).split and not decode.parse([]).split

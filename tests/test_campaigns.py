"""The hardening campaigns (campaigns/, issue 14) in their short versions: CI runs these; the long
runs and their numbers are in docs/hardening.md. Each campaign counts failures instead of
stopping at the first, so these tests assert that the count is zero and show what failed."""

from __future__ import annotations

import importlib.util

import pytest

from campaigns import concurrency, fuzz, kill9, race


def _ok(res):
    assert res.failures == 0, res.examples
    assert res.runs > 0


@pytest.mark.slow
def test_kill9_short(tmp_path):
    res = kill9.run(20, str(tmp_path / "k"), seed=1, cases=[c for c in kill9.CASES if c != "compress"],
                    log=lambda _m: None)
    _ok(res)
    assert {k for k in res.counts if k in kill9.KINDS} == set(kill9.CASES) - {"compress"}
    assert res.counts["killed while running"] >= 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the compress extra is not installed")
def test_kill9_compression_step(tmp_path):
    _ok(kill9.run(2, str(tmp_path / "k"), seed=2, cases=["compress"], log=lambda _m: None))


def test_fuzz_short():
    res = fuzz.run(150, seed=1, log=lambda _m: None)
    _ok(res)
    assert set(res.counts) == set(fuzz.PARSERS)
    assert all(c["cases"] >= 100 for c in res.counts.values()), res.counts


@pytest.mark.slow
def test_concurrency_short(tmp_path):
    _ok(concurrency.run(12, 4, str(tmp_path / "c"), seed=1, log=lambda _m: None))


@pytest.mark.slow
def test_racing_pushes_short(tmp_path):
    pytest.importorskip("moto")
    res = race.run(3, 3, str(tmp_path / "r"), seed=1, log=lambda _m: None)
    _ok(res)
    assert res.counts["rounds"] == {"exactly one won": 3}

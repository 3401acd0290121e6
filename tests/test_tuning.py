"""The CPU kernel's settings per machine: the built-in rule, calibration (with a fake timer: which candidate
wins decides the settings), the cache file keyed by machine and kernel version, and the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import kama
from kama.ops import cpu, tuning
from kama.ops.machine import describe

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="compiled kernel not built")


def test_machine_description():
    m = describe()
    assert m.cores >= 1 and m.simd in ("avx512", "avx2", "avx", "sse", "neon", "unknown")
    assert m.model in m.summary() and "|" in m.key() and " " not in m.slug()
    assert json.loads(json.dumps(m.as_dict()))["model"] == m.model


def test_built_in_rule():
    t = tuning.DEFAULTS
    assert t.tile_width(1, 1024, 4, 1) == 1
    assert t.tile_width(300, 1024, 4, 1) == 128 and t.tile_width(300, 4096, 4, 2) == 64
    small = tuning.Tuning(max_columns=16, forward_min_columns=16)
    assert small.tile_width(300, 1024, 4, 1) == 16
    assert small.tile_width(300, 64, 4, 1) == 128  # under MIN_TUNED_DIM features: the built-in rule
    narrow = tuning.Tuning(max_columns=2, forward_min_columns=2)
    assert narrow.tile_width(3, 1024, 4, 1) == 2  # a cap under one vector holds
    assert t.prefetch_for(t.prefetch_min_bytes + 1) == 2 and t.prefetch_for(1024) == 0


def test_blocked_tile_rule():
    t = tuning.Tuning(blocked_columns=128, tile_budget_bytes=4 * 1024 * 1024)
    assert t.blocked_tile(300, 1024, 4, 1, 8) == 128 and t.blocked_tile(300, 4096, 4, 1, 8) == 64  # half of 2 MiB
    assert t.blocked_tile(20, 1024, 4, 1, 8) == 32 and t.blocked_tile(3, 1024, 4, 1, 8) == 8  # what the batch needs
    assert t.blocked_tile(300, 1 << 20, 4, 2, 8) == 16  # never below 16 columns (or one vector)
    assert tuning.Tuning(blocked_columns=16).blocked_tile(300, 1024, 4, 1, 8) == 16
    # the two-buffer backward has its own width, narrowed by the same budget
    t = tuning.Tuning(blocked_columns=32, blocked_backward_columns=128, tile_budget_bytes=4 * 1024 * 1024)
    assert t.blocked_tile(300, 1024, 4, 1, 8) == 32 and t.blocked_tile(300, 1024, 4, 2, 8) == 128
    assert t.blocked_tile(300, 4096, 4, 2, 8) == 32 and t.blocked_tile(40, 1024, 4, 2, 8) == 64
    # the 512-bit loops keep two vectors (32 float32 / 16 float64 columns) where the budget would leave one
    wide = tuning.Tuning(blocked_columns=128, blocked_backward_columns=128, blocked_vector_bits=512,
                         tile_budget_bytes=2 * 1024 * 1024)
    assert wide.blocked_tile(1024, 4096, 4, 2, 8) == 32 and wide.blocked_tile(1024, 8192, 4, 1, 8) == 32
    assert wide.blocked_tile(1024, 8192, 8, 2, 4) == 16
    assert replace(wide, blocked_vector_bits=256).blocked_tile(1024, 4096, 4, 2, 8) == 16


def test_settings_from_cache_sizes():
    mib = 1024 * 1024
    assert tuning.from_caches(None) == tuning.DEFAULTS and tuning.from_caches(64 * 1024) == tuning.DEFAULTS
    assert tuning.from_caches(mib) == tuning.DEFAULTS  # the built-in settings are the 1 MiB-L2 EPYC's
    big = tuning.from_caches(2 * mib)
    assert (big.tile_budget_bytes, big.prefetch_min_bytes) == (4 * mib, 3 * mib // 2)
    assert big.tile_width(300, 4096, 4, 2) == 128  # two 4096 x 128 float32 buffers fit a 4 MiB budget


@needs_kernel
def test_calibration_takes_the_fastest_candidates():
    seen = []

    def fastest_is_last(candidates, run):  # runs every candidate once, picks the last one
        for c in candidates:
            run(c)
        seen.append(list(candidates))
        return candidates[-1]

    t = tuning.calibrate(timer=fastest_is_last)
    base = tuning.from_caches(describe().l2)
    assert t.tile_budget_bytes == base.tile_budget_bytes
    # the built-in setting first, then the alternatives; 512-bit vectors are a candidate on AVX-512 cores only
    widths = (256, 512) if describe().simd == "avx512" else (256,)
    blocked = [(c, 256) for c in (32, 16, 64, 128)] + [(c, 512) for c in (128, 64, 32) if 512 in widths]
    assert seen == [[(c, b) for b in widths for c in (128, 64, 32)], [32, 16, 64], [2, 0, 4], blocked, [32, 64, 128]]
    assert (t.max_columns, t.forward_min_columns, t.backward_min_columns, t.prefetch, t.blocked_columns,
            t.blocked_backward_columns, t.vector_bits, t.blocked_vector_bits) == (
        32, 32, 32, 4, *blocked[-1][:1], 128, widths[-1], widths[-1])
    assert t.source.startswith("calibrated")

    def fastest_is_first(candidates, run):
        run(candidates[0])
        return candidates[0]

    t = tuning.calibrate(timer=fastest_is_first)
    assert (t.max_columns, t.forward_min_columns, t.backward_min_columns, t.prefetch, t.blocked_columns,
            t.blocked_backward_columns, t.vector_bits, t.blocked_vector_bits) == (
        base.max_columns, base.forward_min_columns, base.backward_min_columns, base.prefetch, base.blocked_columns,
        base.blocked_backward_columns, 256, 256)


@pytest.mark.parametrize("costs, expected", [
    ({"builtin": 1.0, "a": 0.99, "b": 1.2}, "builtin"),   # 1 % faster: not enough to replace the built-in
    ({"builtin": 1.0, "a": 0.90, "b": 0.95}, "a"),        # 10 % faster
    ({"builtin": 1.0, "a": 1.5, "b": 1.1}, "builtin"),
])
def test_best_keeps_the_builtin_setting_unless_another_is_clearly_faster(monkeypatch, costs, expected):
    clock = [0.0]
    calls = []
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])

    def run(c):
        calls.append(c)
        clock[0] += costs[c] * (3.0 if len(calls) % 5 == 0 else 1.0)  # interference slows some calls

    assert tuning._best(["builtin", "a", "b"], run, repeats=4) == expected
    # round-robin: every round times each candidate once, after one warm-up call each
    assert calls == ["builtin", "a", "b"] * 5


PROBE = """
import json, kama, torch
from kama.ops import tuning
x = torch.randn(300, 1024)
kama.givens_apply(x, kama.random_pairs(1024, 2000), kama.random_angles(2000), backend="cpu")
print(json.dumps(tuning.current().__dict__))
"""


def _run(tmp_path, **env):
    full = {**os.environ, "KAMA_CACHE_DIR": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@needs_kernel
def test_first_use_calibrates_once_and_later_processes_read_the_cache(tmp_path):
    first, _ = _run(tmp_path, KAMA_TUNING="auto")
    assert first["source"].startswith("calibrated")
    data = json.loads((tmp_path / "tuning.json").read_text())
    (key,) = data
    assert describe().key() in key and f"kernel {cpu._cgivens.KERNEL_VERSION}" in key
    data[key]["max_columns"] = 16  # a cached value is what later processes use
    data[key]["forward_min_columns"] = 16
    (tmp_path / "tuning.json").write_text(json.dumps(data))
    second, _ = _run(tmp_path, KAMA_TUNING="auto")
    assert second["max_columns"] == 16
    again, _ = _run(tmp_path, KAMA_TUNING="calibrate")  # measured again, cache overwritten
    assert again["source"].startswith("calibrated")
    assert json.loads((tmp_path / "tuning.json").read_text())[key]["max_columns"] == again["max_columns"]
    data = json.loads((tmp_path / "tuning.json").read_text())
    data[key].update(max_columns=32, prefetch=0)  # the environment's values equal the cached ones: still its choice
    (tmp_path / "tuning.json").write_text(json.dumps(data))
    env, _ = _run(tmp_path, KAMA_TUNING="auto", KAMA_TILE_COLUMNS="32", KAMA_PREFETCH="0")
    assert env["max_columns"] == 32 and env["prefetch"] == 0 and env["source"] == "environment"
    (tmp_path / "tuning.json").write_text("not json")  # a damaged cache is measured again
    fresh, _ = _run(tmp_path, KAMA_TUNING="auto")
    assert fresh["source"].startswith("calibrated")


def test_defaults_mode_and_bad_settings(tmp_path):
    got, _ = _run(tmp_path, KAMA_TUNING="defaults")
    assert got["source"] == "defaults" and not (tmp_path / "tuning.json").exists()
    got, err = _run(tmp_path, KAMA_TUNING="sometimes", KAMA_TILE_COLUMNS="48")
    assert "KAMA_TUNING='sometimes'" in err and "max_columns must be a power of two" in err
    got, _ = _run(tmp_path, KAMA_TUNING="defaults", KAMA_TILE_COLUMNS="48")
    assert got["source"] == "defaults"  # a rejected setting fixes nothing
    same = str(tuning.DEFAULTS.max_columns)  # a setting equal to the value in effect is still the user's choice
    got, _ = _run(tmp_path, KAMA_TUNING="defaults", KAMA_TILE_COLUMNS=same)
    assert got["source"] == "environment" and got["max_columns"] == tuning.DEFAULTS.max_columns


@needs_kernel
@pytest.mark.parametrize("cols", [16, 32, 64])
def test_results_do_not_depend_on_the_tile_width(monkeypatch, cols):
    from conftest import set_tuning

    g = torch.Generator().manual_seed(0)
    pairs, angles = kama.random_pairs(300, 2000, generator=g), kama.random_angles(2000, generator=g)
    x = torch.randn(130, 300, generator=g)
    ref = kama.givens_apply(x, pairs, angles, backend="cpu")
    set_tuning(monkeypatch, max_columns=cols, forward_min_columns=cols)
    assert cpu.tile_width(130, 300, 4, 1) == cols
    assert torch.equal(kama.givens_apply(x, pairs, angles, backend="cpu"), ref)  # columns are independent


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["kac", "blocked"])
@pytest.mark.parametrize("cols", [8, 16, 32, 64, 128])
def test_512_bit_loops_agree_with_the_portable_ones(monkeypatch, dtype, family, cols):
    """Forward outputs and input gradients bitwise, angle gradients to rounding (their lanes sum in another order);
    on a core without AVX-512 both settings run the portable loops."""
    from conftest import set_tuning

    d, n = 264, 75  # >= MIN_TUNED_DIM features; 75 rows: whole tiles and a ragged one
    k = 12 * 40 + 7
    g = torch.Generator().manual_seed(cols)
    pairs = kama.random_pairs(d, k, generator=g) if family == "kac" else kama.ops.blocked_pairs(d, k, generator=g)
    plan = kama.GivensPlan(pairs, d)
    angles = kama.random_angles(k, generator=g, dtype=dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    gy = torch.randn(n, d, generator=g, dtype=dtype)
    out = {}
    for bits in (256, 512):
        set_tuning(monkeypatch, vector_bits=bits, blocked_vector_bits=bits, max_columns=cols, forward_min_columns=cols,
                   backward_min_columns=cols, blocked_columns=cols, blocked_backward_columns=cols)
        assert tuning.current().wide(d) == (bits == 512) and not tuning.current().wide(d - 10)
        assert tuning.current().wide_blocked(d) == (bits == 512) and not tuning.current().wide_blocked(d - 10)
        for transpose in (False, True):
            a = angles.clone().requires_grad_(True)
            xi = x.clone().requires_grad_(True)
            y = kama.givens_apply(xi, plan, a, backend="cpu", transpose=transpose)
            gx, ga = torch.autograd.grad(y, (xi, a), gy)
            out[bits, transpose] = (y.detach(), gx, ga)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for transpose in (False, True):
        (y0, gx0, ga0), (y1, gx1, ga1) = out[256, transpose], out[512, transpose]
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
        torch.testing.assert_close(ga1, ga0, rtol=tol, atol=tol * n)
        ref = kama.givens_apply(x, plan, angles, backend="reference", transpose=transpose)
        torch.testing.assert_close(y1, ref, rtol=tol, atol=tol)


def test_vector_bits_from_the_environment(tmp_path):
    got, _ = _run(tmp_path, KAMA_TUNING="defaults", KAMA_VECTOR_BITS="512")
    assert got["vector_bits"] == got["blocked_vector_bits"] == 512 and got["source"] == "environment"
    got, err = _run(tmp_path, KAMA_TUNING="defaults", KAMA_VECTOR_BITS="384")
    assert got["vector_bits"] == 256 and "vector_bits must be 256 or 512, got 384" in err


def test_blocked_columns_from_the_environment_fix_both_passes(tmp_path):
    got, _ = _run(tmp_path, KAMA_TUNING="defaults", KAMA_BLOCKED_COLUMNS="64")
    assert got["blocked_columns"] == got["blocked_backward_columns"] == 64 and got["source"] == "environment"
    got, err = _run(tmp_path, KAMA_TUNING="defaults", KAMA_BLOCKED_COLUMNS="48")
    assert got["blocked_backward_columns"] == tuning.DEFAULTS.blocked_backward_columns
    assert "blocked_backward_columns must be a power of two <= 128, got 48" in err


@needs_kernel
@pytest.mark.parametrize("family", ["kac", "blocked"])
def test_512_bit_loops_gradcheck_and_gradgradcheck(monkeypatch, family):
    from conftest import set_tuning

    set_tuning(monkeypatch, vector_bits=512, blocked_vector_bits=512, max_columns=16, forward_min_columns=16,
               backward_min_columns=16, blocked_columns=16, blocked_backward_columns=16)
    d, k = 256, 12 * 3 + 5
    g = torch.Generator().manual_seed(7)
    pairs = kama.random_pairs(d, k, generator=g) if family == "kac" else kama.ops.blocked_pairs(d, k, generator=g)
    angles = kama.random_angles(k, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(16, d, generator=g, dtype=torch.float64, requires_grad=True)
    for transpose in (False, True):
        f = lambda x, a, t=transpose: kama.givens_apply(x, pairs, a, backend="cpu", transpose=t)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, angles), fast_mode=True)
        assert torch.autograd.gradgradcheck(f, (x, angles), fast_mode=True)

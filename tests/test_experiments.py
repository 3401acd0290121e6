"""``kama reproduce``: end to end, resume after interruption, provenance, bad input; the capacity statistics."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from kama.cli import main
from kama.experiments import capacity
from kama.experiments.base import RunContext
from kama.records import StaleResultWarning

TINY = ["--only", "capacity", "--set", "capacity.walks=200", "--set", "capacity.dims=[8]",
        "--set", "capacity.ratios=[0.5, 2]", "--set", "capacity.fit_ratios=[1, 4]", "--set", "capacity.fit_steps=50"]


# Every experiment at a tiny size: the whole pipeline (units, figures, CSVs, report) in seconds.
TINY_ALL = [
    "capacity.walks=100", "capacity.dims=[8]", "capacity.ratios=[1]", "capacity.fit_dims=[4]",
    "capacity.fit_ratios=[1]", "capacity.fit_steps=20", 'kernel_approx.datasets=["wine"]',
    'kernel_approx.fig1_datasets=["wine"]', "kernel_approx.reps=3", "kernel_approx.blocks=2",
    "kernel_approx.n_points=20", "png_gap.dims=[8]", "png_gap.reps=4", "png_gap.pairs=2", "k_ablation.ratios=[0.5]",
    "k_ablation.n_points=20", "k_ablation.reps=3", "feature_speed.dims=[16]", "feature_speed.n_points=50",
    "feature_speed.repeats=1", "manifold.theorem_d=6", "manifold.theorem_steps=20", "manifold.d=6",
    "manifold.steps=30", "manifold.rgd_steps=10", "manifold.adam_steps=20", "manifold.capacity_d=4",
    "manifold.capacity_ratios=[1]", "digits.epochs=2", "digits.seeds=[0]", 'digits.variants=["dense", "kama"]',
    'rl.study={"tasks": ["InvertedPendulum-v5"], "algos": ["ppo"], "seeds": [0], "hidden": {"ppo": 8}, '
    '"num_rotations": [10], "total_timesteps": 256, "eval_every": 256, "eval_episodes": 1, '
    '"algo_kwargs": {"ppo": {"n_steps": 128, "batch_size": 64}}}',
    "rl.workers=1", 'rl.table_tasks=["Hopper-v5"]', "es.seeds=[0]",
    'es.es={"hidden": 4, "num_rotations": 4, "total_timesteps": 400, "population": 4, "eval_every": 200, '
    '"eval_episodes": 1}',
]
OUTPUTS = ("capacity/capacity.png", "capacity/capacity_mixing.csv", "kernel_approx/figure1_pointwise_mse.png",
           "kernel_approx/figure2_gram_error.png", "png_gap/png_gap.png", "k_ablation/k_ablation.png",
           "feature_speed/feature_speed.png", "rl/learning_curves.png", "rl/table1.csv", "rl/final_returns.csv",
           "es/es_curves.png", "es/es_returns.csv", "manifold/theorem3.png", "manifold/convergence.png",
           "digits/digits.png", "digits/digits_accuracy.csv")


def _check_report(out, experiments):
    report = (out / "report.md").read_text()
    assert "quick mode" in report and "capacity/capacity.png" in report
    for name in experiments:
        done = json.loads((out / name / "done.json").read_text())
        assert done["git_commit"] and done["kama_version"] and done["config_hash"] and done["outputs"], name
        assert (out / name / "summary.md").stat().st_size > 0
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    header = (out / "capacity" / "capacity_mixing.csv").read_text().splitlines()[0]
    assert header.split(",")[:4] == ["d", "ratio", "k", "ks"]


def test_reproduce_every_experiment_tiny_via_console_script(tmp_path):
    pytest.importorskip("stable_baselines3")
    out = tmp_path / "results"
    sets = [a for s in TINY_ALL for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "kama.cli", "reproduce", "--quick", "--out", str(out),
                           "--no-progress", *sets], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    from kama.experiments import load_experiments

    _check_report(out, list(load_experiments()))


@pytest.mark.slow
def test_reproduce_quick_end_to_end_via_console_script(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "kama.cli", "reproduce", "--quick", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    done = json.loads((out / "capacity" / "done.json").read_text())
    assert done["config"]["seed"] == 0
    from kama.experiments import load_experiments

    _check_report(out, list(load_experiments()))


def test_rerun_skips_finished_and_resumes_interrupted(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["reproduce", "--quick", "--out", str(out), "--no-progress", *TINY]) == 0
    first = json.loads((out / "capacity" / "done.json").read_text())
    assert main(["reproduce", "--quick", "--out", str(out), "--no-progress", *TINY]) == 0
    assert json.loads((out / "capacity" / "done.json").read_text()) == first  # not rerun
    assert "reused" in (out / "report.md").read_text()
    # Interrupted: the experiment never finished, but three units are stored and are not recomputed.
    (out / "capacity" / "done.json").unlink()
    units = sorted((out / "capacity" / "units").glob("*.json"))
    assert len(units) == 3
    stamps = [u.stat().st_mtime_ns for u in units]
    assert main(["reproduce", "--quick", "--out", str(out), "--no-progress", *TINY]) == 0
    assert "3 stored units reused" in (out / "report.md").read_text()
    assert [u.stat().st_mtime_ns for u in units] == stamps
    # A different config does not reuse units; --force recomputes.
    assert main(["reproduce", "--quick", "--out", str(out), "--no-progress", *TINY[:-2],
                 "--set", "capacity.fit_steps=60"]) == 0  # TINY ends with the fit_steps override
    assert "0 stored units reused" in (out / "report.md").read_text()
    assert main(["reproduce", "--quick", "--out", str(out), "--no-progress", "--force", *TINY]) == 0
    assert "0 stored units reused" in (out / "report.md").read_text()


def test_corrupt_unit_is_recomputed(tmp_path):
    ctx = RunContext(out_dir=tmp_path)
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "u.json").write_text("{not json")
    with pytest.warns(StaleResultWarning, match="not valid JSON"):
        assert ctx.unit("u", lambda: [1, 2]) == [1, 2]
    assert ctx.unit("u", lambda: [3]) == [1, 2]
    assert ctx.units_done == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "--only", "nope"], "unknown experiment"),
        (["reproduce", "--set", "capacity.bogus=1"], "unknown config field"),
        (["reproduce", "--only", "capacity", "--set", "other.x=1"], "not being run"),
        (["reproduce", "--only", "capacity", "--set", "capacity.walks=abc"], "capacity.walks must be"),
        (["reproduce", "--only", "capacity", "--set", "capacity.dims=5"], "capacity.dims must be"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_set_syntax_and_list(capsys):
    with pytest.raises(SystemExit, match="EXPERIMENT.FIELD=JSON"):
        main(["reproduce", "--set", "walks=3"])
    assert main(["list"]) == 0
    assert "capacity" in capsys.readouterr().out


def test_reproduce_bad_mode():
    from kama.experiments import reproduce

    with pytest.raises(ValueError, match="mode must be"):
        reproduce(mode="medium")


def test_kac_walk_mixes_at_d_log_d_scale():
    rows = capacity.mixing_statistics(16, (0.25, 4.0), walks=3000, seed=1)
    early, late = rows
    # Far from Haar after 0.25 d ln d steps; within noise of Haar after 4 d ln d.
    assert early["m4_ratio"] > 2.5 and early["ks"] > 0.2
    assert abs(late["m4_ratio"] - 1) < 0.1
    assert late["ks"] < 3 * late["ks_haar_floor"]


def test_fitting_needs_about_dim_so_d_rotations():
    few = capacity.fit_error(6, 0.5, steps=200, lr=0.05, seed=0)
    many = capacity.fit_error(6, 4.0, steps=400, lr=0.05, seed=0)
    assert few["k"] < 6 * 5 / 2 <= many["k"]
    assert few["rel_error"] > 0.3
    assert many["rel_error"] < 1e-3


def test_haar_rotation_is_special_orthogonal():
    import torch

    q = capacity.haar_rotation(7, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(7, dtype=torch.float64))
    assert math.isclose(float(torch.linalg.det(q)), 1.0, rel_tol=1e-9)


def test_gram_errors_show_the_papers_ordering():
    from kama.experiments import kernel_approx as kernels

    X = kernels.subset("parkinson", 120, True, 0)
    urn = kernels.gram_errors(X, "gaussian", 2, 30, 1)
    krn = kernels.gram_errors(X, "kama", 2, 30, 2)
    # more features, less error; KRN below URN (measured ratio ~0.8 at m = d)
    assert urn["rel_mean"][1] < urn["rel_mean"][0] and krn["rel_mean"][1] < krn["rel_mean"][0]
    assert krn["rel_mean"][0] < 0.92 * urn["rel_mean"][0]
    assert krn["mse_mean"][0] < 0.85 * urn["mse_mean"][0]


def test_gram_errors_match_direct_computation():
    import torch

    from kama.experiments import kernel_approx as kernels
    from kama.png import png_kernel

    X = kernels.subset("boston", 20, True, 0)
    res = kernels.gram_errors(X, "orthogonal", 1, 1, 5)
    gen = torch.Generator().manual_seed(5)
    from kama.features import random_matrix

    s = torch.sign(random_matrix("orthogonal", X.shape[1], X.shape[1], generator=gen, dtype=torch.float32)
                   .apply(X.float()))
    est = (s @ s.T / X.shape[1]).double()
    K = png_kernel(X, X, "angular")
    off = ~torch.eye(20, dtype=torch.bool)
    assert abs(res["rel_mean"][0] - float((est - K).norm() / K.norm())) < 1e-5
    assert abs(res["mse_mean"][0] - float((est - K)[off].pow(2).mean())) < 1e-6


def test_png_gap_is_positive_and_order_one_over_d():
    from kama.experiments import kernel_approx as kernels

    cfg = kernels.GapConfig(dims=(32,), functions=("sign", "tanh"), pairs=16, reps=150)
    row = kernels.mse_gap(32, "orthogonal", cfg, 0)
    for f in ("sign", "tanh"):
        # the gap times d is positive (beyond 3 s.e.) and below the URN MSE times d
        assert row[f"{f}_gap_x_d"] > 3 * row[f"{f}_gap_x_d_se"]
        assert row[f"{f}_gap_x_d"] < row[f"{f}_urn_mse_x_d"]


def test_iqm_with_stratified_bootstrap():
    import numpy as np

    from kama.experiments.rl_policies import iqm_with_ci

    scores = np.arange(1, 9, dtype=float)[:, None] * np.ones((1, 2))  # 8 runs x 2 tasks
    mid, lo, hi = iqm_with_ci(scores, reps=500)
    assert mid == 4.5  # the mean of the middle half of 1..8 (each twice)
    assert lo < mid < hi
    const = np.full((5, 3), 2.0)
    assert iqm_with_ci(const, reps=50) == (2.0, 2.0, 2.0)


def test_digits_networks_count_and_train():
    pytest.importorskip("sklearn")
    from kama.experiments.digits import DigitsConfig, make_network, parameter_count, train_one

    counts = {v: parameter_count(make_network(v, 64, 0, 0)) for v in ("dense", "kama", "kama-paper", "toeplitz")}
    # dense 64*64+64 + 64*64+64 + 64*10+10; KAMA K = ceil(64 ln 64) = 267 angles per layer + scalars + biases
    assert counts == {"dense": 8970, "kama": 1077, "kama-paper": 1077, "toeplitz": 465}
    r = train_one(DigitsConfig(epochs=3, seeds=(0,)), "dense", 0)
    assert len(r["test_accuracy"]) == 3 and r["test_accuracy"][-1] > 0.8  # chance is 0.1
    r = train_one(DigitsConfig(epochs=3, seeds=(0,)), "kama", 0)
    assert r["parameters"] == 1077 and all(0.0 <= a <= 1.0 for a in r["test_accuracy"])
    with pytest.raises(ValueError, match="variants"):
        DigitsConfig(variants=("dense", "lowrank"))

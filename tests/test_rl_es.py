"""Evolution strategies for compact policies: determinism, fast inference equals torch, improvement, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("sb3_contrib")
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402

from kama import KamaLinear  # noqa: E402
from kama.cli import main  # noqa: E402
from kama.rl.es import ESConfig, RayAsyncEval, StructuredARSPolicy, make_es_model, train_es, validate_es  # noqa: E402

FAST = {"env_id": "InvertedPendulum-v5", "hidden": 8, "num_rotations": 20, "population": 8, "eval_episodes": 3}


def returns(folder):
    return [float(line.split(",")[1]) for line in (folder / "returns.csv").read_text().splitlines()[1:]]


def test_same_seed_same_returns(tmp_path):
    cfg = ESConfig(**FAST, total_timesteps=3000, eval_every=1500)
    assert returns(train_es(cfg, tmp_path / "a")) == returns(train_es(cfg, tmp_path / "b"))


def test_short_es_run_improves_the_return(tmp_path):
    # Measured: initial returns ~25 (the pole falls at once); after 15k steps 40 and 1000 for seeds 0 and 1.
    finals, starts = [], []
    for seed in (0, 1):
        r = returns(train_es(ESConfig(**FAST, total_timesteps=15000, eval_every=5000, seed=seed), tmp_path / str(seed)))
        starts.append(r[0])
        finals.append(r[-1])
    assert np.mean(finals) > 3 * np.mean(starts)  # stated margin: at least 3x the initial mean return


@pytest.mark.parametrize("arch", ["kama", "toeplitz", "mlp"])
def test_fast_predictions_equal_the_torch_forward(arch):
    model = make_es_model(ESConfig(**{**FAST, "architecture": arch}))
    policy: StructuredARSPolicy = model.policy
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    obs = torch.randn(20, 4)
    with torch.no_grad():
        ref = policy(obs)
        fast = policy._predict(obs)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    w = torch.nn.utils.parameters_to_vector(policy.parameters()).detach()
    for shift in (0.1, 0.2):  # candidates reuse freed memory: the same data pointers with version 0
        policy.load_from_vector((w + shift).numpy())
        with torch.no_grad():
            torch.testing.assert_close(policy._predict(obs), policy(obs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, match", [
    ({"population": 1}, "population must be >= 2"),
    ({"population": 7}, "population must be even"),
    ({"n_top": 9}, "n_top must be <= population / 2"),
    ({"sigma": 0.0}, "sigma must be a positive number"),
    ({"learning_rate": -1.0}, "learning_rate must be a positive number"),
    ({"architecture": "lowrank"}, "architecture must be one of"),
    ({"env_id": "NoSuchEnv-v0"}, "not a registered gymnasium environment"),
    ({"env_id": "CartPole-v1"}, "action space must be a 1-D gymnasium.spaces.Box"),
    ({"workers": 0}, "workers must be >= 1"),
    ({"backend": "slurm"}, "backend must be one of"),
    ({"action_gain": 0.0}, "action_gain must be a positive number"),
    ({"angle_gain": "fast"}, "angle_gain must be one of"),
    ({"angle_gain": -1.0}, "angle_gain must be > 0"),
    ({"plane_sampler": "uniform"}, "plane_sampler must be one of"),
])
def test_bad_es_config_fails_before_any_rollout(change, match):
    with pytest.raises(ValueError, match=match):
        validate_es(ESConfig(**{**FAST, **change}))


def test_cli_es(tmp_path, capsys):
    out = tmp_path / "es"
    assert main(["rl", "es", "--env", "InvertedPendulum-v5", "--hidden", "8", "--rotations", "10", "--steps", "1000",
                 "--population", "4", "--eval-every", "1000", "--eval-episodes", "1", "--out", str(out)]) == 0
    assert (out / "returns.csv").exists() and (out / "model.zip").exists()
    assert main(["rl", "es", "--population", "3", "--out", str(tmp_path / "x")]) == 2
    assert "population must be even" in capsys.readouterr().err


def test_worker_processes_and_ray_actors_give_the_same_run(tmp_path):
    pytest.importorskip("ray")
    cfg = ESConfig(**FAST, total_timesteps=2000, eval_every=1000, workers=2)
    local = returns(train_es(cfg, tmp_path / "local"))
    ray_run = returns(train_es(dataclasses.replace(cfg, backend="ray"), tmp_path / "ray"))
    assert local == ray_run and len(local) >= 3


def test_ray_evaluator_protocol_errors():
    ray = pytest.importorskip("ray")
    cfg = ESConfig(**{**FAST, "normalize_observations": False})
    model = make_es_model(cfg)
    ev = RayAsyncEval([lambda: make_vec_env(cfg.env_id, n_envs=1, seed=1)], model.policy)
    try:
        with pytest.raises(RuntimeError, match="get_results called before send_jobs"):
            ev.get_results()
        with pytest.raises(RuntimeError, match="sync_obs_rms needs environments wrapped in VecNormalize"):
            ev.sync_obs_rms(None)
        assert ev.get_obs_rms() == [None] and ev.seed(None) == []
    finally:
        ev.close()
    assert not ray.is_initialized()


@pytest.mark.parametrize("arch", ["kama", "mlp"])
def test_numpy_predict_equals_sb3_predict(arch):
    from stable_baselines3.common.policies import BasePolicy

    model = make_es_model(ESConfig(**{**FAST, "env_id": "Swimmer-v5", "architecture": arch}))
    policy: StructuredARSPolicy = model.policy
    rng = np.random.default_rng(0)
    for obs in (rng.normal(size=8), rng.normal(size=(5, 8)), rng.normal(size=(1, 8)).astype(np.float32)):
        fast, _ = policy.predict(obs)
        ref, _ = BasePolicy.predict(policy, obs)
        assert fast.shape == ref.shape and fast.dtype == ref.dtype
        np.testing.assert_array_equal(fast, ref)
    with pytest.raises(ValueError, match="Error: Unexpected observation shape"):
        policy.predict(rng.normal(size=(3, 7)))


def test_action_gain_sets_the_initial_action_layer_and_is_checked():
    small = make_es_model(ESConfig(**FAST)).policy
    big = make_es_model(ESConfig(**{**FAST, "action_gain": 1.0})).policy
    assert torch.allclose(big.action_net[4].scale, 100 * small.action_net[4].scale)
    with pytest.raises(ValueError, match="action_gain must be a positive number"):
        StructuredARSPolicy(small.observation_space, small.action_space, action_gain=-1.0)


def test_angle_gain_and_live_planes_reach_every_kama_layer(tmp_path):
    paper = make_es_model(ESConfig(**FAST)).policy
    assert all(layer.angle_gain == 1.0 for layer in paper.action_net if isinstance(layer, KamaLinear))
    model = make_es_model(ESConfig(**{**FAST, "angle_gain": "dense", "plane_sampler": "live"}))
    layers = [m for m in model.policy.action_net if isinstance(m, KamaLinear)]
    assert len(layers) == 3 and all(m.plane_sampler == "live" and m.angle_gain != 1.0 for m in layers)
    assert layers[-1].angle_gain > 50  # the action layer starts at gain 0.01
    assert all(int(m.dead_rotations().sum()) == 0 for m in layers)
    model.save(tmp_path / "m.zip")  # the policy's constructor parameters carry both options
    again = type(model).load(tmp_path / "m.zip").policy
    assert [m.angle_gain for m in again.action_net if isinstance(m, KamaLinear)] == [m.angle_gain for m in layers]
    with pytest.raises(ValueError, match="plane_sampler must be one of"):
        StructuredARSPolicy(paper.observation_space, paper.action_space, plane_sampler="uniform")

"""Compact policies for PPO and TRPO: training, every parameter learns, save/load, TRPO's Hessian-vector
product through KAMA layers, Table 1 counting, determinism, the run writer and bad input."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
pytest.importorskip("sb3_contrib")
from sb3_contrib import TRPO  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402

from kama import KamaLinear, ToeplitzLinear  # noqa: E402
from kama.cli import main  # noqa: E402
from kama.rl import KamaActorCriticPolicy, actor_parameter_count  # noqa: E402
from kama.rl.train import RunConfig, evaluate, make_model, train, validate  # noqa: E402

SMALL = {"n_steps": 256, "batch_size": 64}


def model(algo, arch, env="InvertedPendulum-v5", seed=0, **kw):
    cls = PPO if algo == "ppo" else TRPO
    return cls(KamaActorCriticPolicy, env, seed=seed, device="cpu", **SMALL,
               policy_kwargs={"architecture": arch, "hidden": 16, "num_rotations": 40, **kw})


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
@pytest.mark.parametrize("arch", ["kama", "toeplitz", "mlp"])
def test_policies_train_and_every_parameter_changes(algo, arch):
    m = model(algo, arch, structured_critic=True)
    before = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
    m.learn(1024)
    for n, p in m.policy.named_parameters():
        assert not torch.equal(before[n], p.detach()), f"{algo}/{arch}: {n} did not change"
    layer_types = {type(mod) for mod in m.policy.modules()}
    expected = {"kama": KamaLinear, "toeplitz": ToeplitzLinear, "mlp": torch.nn.Linear}[arch]
    assert expected in layer_types
    assert type(m.policy.action_net) is expected and type(m.policy.value_net) is expected


def test_dense_critic_by_default_and_learned_planes():
    m = model("ppo", "kama", learn_planes=True)
    assert isinstance(m.policy.value_net, torch.nn.Linear)
    assert isinstance(m.policy.mlp_extractor.value_net[0], torch.nn.Linear)
    assert m.policy.mlp_extractor.policy_net[0].learn_planes
    pairs_before = m.policy.mlp_extractor.policy_net[2].pairs.clone()
    m.learn(1024)
    assert not torch.equal(pairs_before, m.policy.mlp_extractor.policy_net[2].pairs)  # planes moved


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_save_load_gives_identical_actions(tmp_path, algo):
    m = model(algo, "kama")
    m.learn(512)
    m.save(tmp_path / "m.zip")
    cls = PPO if algo == "ppo" else TRPO
    loaded = cls.load(tmp_path / "m.zip", device="cpu")
    assert isinstance(loaded.policy.action_net, KamaLinear)
    obs = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    a1, _ = m.predict(obs, deterministic=True)
    a2, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    for (n1, t1), (n2, t2) in zip(m.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2)


def test_trpo_hessian_vector_product_matches_finite_differences():
    m = model("trpo", "kama")
    policy = m.policy.double()
    obs = torch.as_tensor(np.random.default_rng(1).normal(size=(64, 4)))
    params = [p for n, p in policy.named_parameters() if "value" not in n]
    def dist() -> torch.distributions.Normal:  # the actor's Gaussian, in float64 (SB3 casts obs to float32)
        mean = policy.action_net(policy.mlp_extractor.forward_actor(obs))
        return torch.distributions.Normal(mean, policy.log_std.exp().expand_as(mean))

    with torch.no_grad():
        old = dist()
        old_mean, old_std = old.mean.clone(), old.stddev.clone()

    def kl() -> torch.Tensor:  # TRPO's constraint, as sb3-contrib computes it
        ref = torch.distributions.Normal(old_mean, old_std)
        return torch.distributions.kl_divergence(ref, dist()).sum(-1).mean()

    # Move away from the minimum of the KL (where its gradient vanishes) before probing.
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    grads = torch.autograd.grad(kl(), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    v = torch.randn_like(flat)
    hvp = torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, params)])

    def grad_at(eps: float) -> torch.Tensor:
        offset = 0
        with torch.no_grad():
            for p in params:
                p.add_(eps * v[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl(), params)])
        offset = 0
        with torch.no_grad():
            for p in params:
                p.sub_(eps * v[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        return g

    eps = 1e-5
    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    assert torch.allclose(hvp, fd, rtol=1e-4, atol=1e-6), float((hvp - fd).abs().max())


@pytest.mark.parametrize("env, kama_ratio, toeplitz_ratio", [
    ("Hopper-v5", 0.158, 0.078), ("HalfCheetah-v5", 0.144, 0.072), ("Walker2d-v5", 0.144, 0.072)])
def test_table1_counting_from_the_models(env, kama_ratio, toeplitz_ratio):
    counts = {}
    for arch in ("kama", "toeplitz", "mlp"):
        m = PPO(KamaActorCriticPolicy, env, device="cpu",
                policy_kwargs={"architecture": arch, "hidden": 64, "num_rotations": 200})
        counts[arch] = actor_parameter_count(m.policy)
    e = gym.make(env)
    o, a = e.observation_space.shape[0], e.action_space.shape[0]
    assert counts["mlp"] == o * 64 + 64 + 64 * 64 + 64 + 64 * a + a
    assert counts["kama"] == (200 + o + 64) + (200 + 64 + 64) + (200 + a + a)
    assert counts["toeplitz"] == (o + 64 - 1 + 64) + (64 + 64 - 1 + 64) + (64 + a - 1 + a)
    assert counts["kama"] / counts["mlp"] == pytest.approx(kama_ratio, abs=0.001)
    assert counts["toeplitz"] / counts["mlp"] == pytest.approx(toeplitz_ratio, abs=0.001)


def test_same_seed_same_returns(tmp_path):
    cfg = RunConfig(total_timesteps=512, eval_every=512, eval_episodes=2, hidden=16, num_rotations=40,
                    algo_kwargs=SMALL)
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    assert (a / "returns.csv").read_text() .split("\n")[1].split(",")[:2] == \
        (b / "returns.csv").read_text().split("\n")[1].split(",")[:2]
    ra = [line.split(",")[1] for line in (a / "returns.csv").read_text().splitlines()[1:]]
    rb = [line.split(",")[1] for line in (b / "returns.csv").read_text().splitlines()[1:]]
    assert ra == rb
    meta = json.loads((a / "config.json").read_text())
    assert meta["finished"] and meta["git_commit"] and meta["config"]["seed"] == 0
    assert (a / "model.zip").exists()


def test_evaluate_is_deterministic():
    m = make_model(RunConfig(hidden=8, num_rotations=10, algo_kwargs=SMALL))
    assert evaluate(m, "InvertedPendulum-v5", 2, 3) == evaluate(m, "InvertedPendulum-v5", 2, 3)


@pytest.mark.parametrize("change, err, match", [
    ({"env_id": "NoSuchEnv-v0"}, ValueError, "not a registered gymnasium environment"),
    ({"env_id": "CartPole-v1"}, ValueError, "action space must be a 1-D gymnasium.spaces.Box"),
    ({"algo": "sac"}, ValueError, "algo must be one of"),
    ({"architecture": "lowrank"}, ValueError, "architecture must be one of"),
    ({"hidden": 0}, ValueError, "hidden must be >= 1"),
    ({"num_rotations": 0}, ValueError, "num_rotations must be >= 1"),
    ({"total_timesteps": 0}, ValueError, "total_timesteps must be >= 1"),
    ({"algo_kwargs": [1]}, TypeError, "algo_kwargs must be a dict"),
    ({"structured_critic": "false"}, TypeError, "structured_critic must be true or false"),
    ({"learn_planes": ["no"]}, TypeError, "learn_planes must be true or false"),
    ({"hidden": "64"}, TypeError, "hidden must be an int"),
    ({"env_id": 3}, TypeError, "env_id must be a gymnasium id"),
    ({"algo_kwargs": {"n_steps": 0}}, ValueError, r"algo_kwargs\['n_steps'\] must be >= 2, got 0"),
    ({"algo_kwargs": {"n_steps": 64.5}}, TypeError, r"algo_kwargs\['n_steps'\] must be an int"),
    ({"algo_kwargs": {"learning_rate": -1e-3}}, ValueError, r"algo_kwargs\['learning_rate'\] must be > 0"),
    ({"algo_kwargs": {"gamma": 1.5}}, ValueError, r"algo_kwargs\['gamma'\] must be <= 1"),
    ({"algo_kwargs": {"n_stepz": 64}}, ValueError, "PPO takes no argument 'n_stepz'"),
    ({"algo_kwargs": {"seed": 3}}, ValueError, "algo_kwargs cannot set 'seed'"),
    ({"algo": "trpo", "algo_kwargs": {"clip_range": 0.2}}, ValueError, "TRPO takes no argument 'clip_range'"),
    ({"algo": "trpo", "algo_kwargs": {"cg_max_steps": 0}}, ValueError, r"algo_kwargs\['cg_max_steps'\] must be"),
])
def test_bad_config_fails_before_training(change, err, match):
    with pytest.raises(err, match=match):
        validate(RunConfig(**change))


def test_algorithm_assertions_become_value_errors():
    from kama.rl.train import make_model as make

    with pytest.raises(ValueError, match="rejected by PPO: `clip_range_vf` must be positive"):  # an SB3 assert
        make(RunConfig(hidden=8, num_rotations=10, algo_kwargs={**SMALL, "clip_range_vf": -0.1}))


def test_policy_rejects_bad_spaces_and_sizes():
    with pytest.raises(ValueError, match="observation space"):
        PPO(KamaActorCriticPolicy, "FrozenLake-v1", device="cpu")
    with pytest.raises(ValueError, match="num_rotations must be >= 1"):
        model("ppo", "kama", num_rotations=0)
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        PPO(KamaActorCriticPolicy, "InvertedPendulum-v5", device="cpu", policy_kwargs={"hidden": 0})


def test_cli_rl_train(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["rl", "train", "--steps", "256", "--eval-every", "256", "--eval-episodes", "1", "--hidden", "8",
                 "--rotations", "10", "--algo-kwargs", json.dumps(SMALL), "--out", str(out)]) == 0
    assert (out / "returns.csv").exists() and json.loads((out / "config.json").read_text())["finished"]
    assert main(["rl", "train", "--env", "NoSuchEnv-v0", "--out", str(tmp_path / "x")]) == 2
    assert "not a registered" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["kama", "toeplitz", "mlp"])
def test_fast_actor_equals_the_torch_policy(arch):
    from kama.rl.fast import FastActor

    m = PPO(KamaActorCriticPolicy, "HalfCheetah-v5", device="cpu",
            policy_kwargs={"architecture": arch, "hidden": 64, "num_rotations": 200})
    with torch.no_grad():  # make the heads non-trivial
        for p in m.policy.action_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fast = FastActor.from_policy(m.policy)
    obs = np.random.default_rng(0).normal(size=(50, 17))
    with torch.no_grad():
        t = torch.as_tensor(obs, dtype=torch.float32)
        ref = m.policy.action_net(m.policy.mlp_extractor.forward_actor(t)).double().numpy()
    np.testing.assert_allclose(fast(obs), ref, rtol=1e-4, atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(fast(obs[i]), ref[i], rtol=1e-4, atol=1e-5)
    # deterministic SB3 actions are the (clipped) means
    act, _ = m.predict(obs[:1].astype(np.float32), deterministic=True)
    np.testing.assert_allclose(np.clip(fast(obs[0]), -1, 1), act[0], rtol=1e-4, atol=1e-5)
    # after an update, refresh() follows the parameters
    with torch.no_grad():
        for p in m.policy.parameters():
            p.add_(0.1)
    fast.refresh()
    with torch.no_grad():
        ref2 = m.policy.action_net(m.policy.mlp_extractor.forward_actor(t)).double().numpy()
    np.testing.assert_allclose(fast(obs), ref2, rtol=1e-4, atol=1e-5)


def test_fast_actor_rejects_unknown_modules():
    from kama.rl.fast import FastActor

    with pytest.raises(TypeError, match="unsupported module Softmax"):
        FastActor([torch.nn.Linear(3, 3), torch.nn.Softmax(dim=-1)])


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_normalized_runs_save_their_statistics_and_act_identically_after_load(tmp_path, algo):
    from kama.rl.train import load_run

    cfg = RunConfig(algo=algo, hidden=8, num_rotations=10, normalize=True, angle_gain="dense",
                    plane_sampler="live", total_timesteps=512, eval_every=256, eval_episodes=1,
                    algo_kwargs={"n_steps": 256, "batch_size": 64} if algo == "ppo" else {"n_steps": 256})
    out = train(cfg, tmp_path / "run")
    meta = json.loads((out / "config.json").read_text())
    assert "vecnormalize.pkl" in meta["outputs"] and meta["config"]["normalize"] is True
    model, norm = load_run(out)
    assert norm is not None and not norm.training and not norm.norm_reward
    assert model.policy.action_net.angle_gain > 1 and int(model.policy.action_net.dead_rotations().sum()) == 0
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    trained = make_model(cfg)
    trained.set_parameters(str(out / "model.zip"))
    a1, _ = model.predict(norm.normalize_obs(obs), deterministic=True)
    a2, _ = trained.predict(norm.normalize_obs(obs), deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    assert norm.obs_rms.count > 256  # the statistics of the training run, not a fresh normalizer
    rets = evaluate(model, cfg.env_id, 2, 7, norm)
    assert rets == evaluate(model, cfg.env_id, 2, 7, norm)
    updates = (out / "updates.csv").read_text().splitlines()
    assert len(updates) >= 2 and updates[0].startswith("timesteps,")
    if algo == "ppo":
        assert "approx_kl" in updates[0] and "clip_fraction" in updates[0]


def test_policy_passes_the_kama_options_to_every_layer():
    m = model("ppo", "kama", angle_gain="dense", plane_sampler="live", structured_critic=True)
    layers = [mod for mod in m.policy.modules() if isinstance(mod, KamaLinear)]
    assert len(layers) == 6 and all(layer.plane_sampler == "live" and layer.angle_gain > 1 for layer in layers)
    assert m.policy.action_net.angle_gain > 50  # the head starts at SB3's gain 0.01
    paper = model("ppo", "kama")
    assert all(mod.angle_gain == 1.0 for mod in paper.policy.modules() if isinstance(mod, KamaLinear))
    with pytest.raises(ValueError, match="net_arch is not used"):
        model("ppo", "kama", net_arch=[8])


@pytest.mark.parametrize("change, err, match", [
    ({"angle_gain": "fast"}, ValueError, "angle_gain must be one of"),
    ({"angle_gain": -2.0}, ValueError, "angle_gain must be > 0"),
    ({"plane_sampler": "uniform"}, ValueError, "plane_sampler must be one of"),
    ({"normalize": "yes"}, TypeError, "normalize must be true or false"),
])
def test_bad_adaptive_run_options(change, err, match):
    with pytest.raises(err, match=match):
        validate(RunConfig(**change))


def test_cli_normalize_flag_defaults_to_the_run_config():
    from kama.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["rl", "train"]).normalize is None and RunConfig.normalize is True
    assert parse(["rl", "train", "--no-normalize"]).normalize is False
    assert parse(["rl", "train", "--normalize"]).normalize is True
    args = parse(["rl", "train"])
    assert (args.angle_gain, args.plane_sampler) == (1.0, "live")

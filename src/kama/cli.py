"""The ``kama`` command line: ``kama reproduce`` and ``kama list``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .nn import DEFAULT_ANGLE_GAIN, DEFAULT_PLANE_SAMPLER


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        exp, dot, field = key.partition(".")
        if not sep or not dot or not exp or not field:
            raise SystemExit(f"kama: --set expects EXPERIMENT.FIELD=JSON, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(exp, {})[field] = parsed
    return out


def _gain(text: str) -> float | str:
    """``--angle-gain``: a rule name (``dense``) or a number."""
    try:
        return float(text)
    except ValueError:
        return text


def build_parser() -> argparse.ArgumentParser:
    """The ``kama`` command's argument parser (subcommands ``reproduce``, ``list`` and ``rl``)."""
    parser = argparse.ArgumentParser(prog="kama", description="KAMA-NNs: reproduce the paper's experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the registered experiments; write figures, CSVs and report.md")
    mode = rep.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small, fast (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="the paper's protocol")
    rep.set_defaults(mode="quick")
    rep.add_argument("--only", nargs="+", metavar="NAME", help="run only these experiments (see `kama list`)")
    rep.add_argument("--out", default="results", help="output folder (default: results)")
    rep.add_argument("--set", action="append", default=[], metavar="EXP.FIELD=JSON",
                     help="override a config field, e.g. --set capacity.walks=200 (repeatable)")
    rep.add_argument("--force", action="store_true", help="recompute finished experiments")
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("list", help="list the registered experiments and their configs")
    rl = sub.add_parser("rl", help="reinforcement learning with compact policies (needs the 'rl' extra)")
    rl_sub = rl.add_subparsers(dest="rl_command", required=True)
    tr = rl_sub.add_parser("train", help="train one PPO/TRPO run; write returns.csv, config.json, model.zip")
    tr.add_argument("--env", default="InvertedPendulum-v5", help="gymnasium id (Box spaces), e.g. Hopper-v5")
    tr.add_argument("--algo", default="ppo", help="ppo or trpo")
    tr.add_argument("--policy", default="kama", help="kama, toeplitz or mlp")
    tr.add_argument("--hidden", type=int, default=64, help="hidden units h (paper: 64 PPO, 32 TRPO)")
    tr.add_argument("--rotations", type=int, default=200, help="Givens rotations per layer K (paper: 200 / 100)")
    tr.add_argument("--structured-critic", action="store_true", help="structure the critic too (default: dense)")
    tr.add_argument("--learn-planes", action="store_true", help="learn the rotation planes (section 6.3)")
    tr.add_argument("--angle-gain", default=DEFAULT_ANGLE_GAIN, type=_gain,
                    help="KAMA angle gain: 'dense' (a dense layer's step size) or a number; 1.0 is the paper's "
                    "(default: %(default)s)")
    tr.add_argument("--plane-sampler", default=DEFAULT_PLANE_SAMPLER,
                    help="KAMA planes: iid (the paper's) or live (no dead rotation) (default: %(default)s)")
    tr.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                    help="VecNormalize observations and rewards, as OpenAI baselines' MuJoCo runs (default: "
                    "RunConfig's)")
    tr.add_argument("--steps", type=int, default=100_000, help="environment steps")
    tr.add_argument("--eval-every", type=int, default=10_000, help="steps between evaluations")
    tr.add_argument("--eval-episodes", type=int, default=5)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--algo-kwargs", default="{}", help='JSON keyword arguments of PPO/TRPO, e.g. {"n_steps": 1024}')
    tr.add_argument("--out", default=None, help="output folder (default: results/rl/ENV-ALGO-POLICY-sSEED)")
    st = rl_sub.add_parser("study", help="run a sweep of runs from a JSON config; resumes after interruption")
    st.add_argument("--config", required=True, help="JSON file with StudyConfig fields (see kama.rl.study)")
    st.add_argument("--out", default="results/rl-study", help="output folder (one subfolder per run)")
    st.add_argument("--backend", default="local", help="local (process pool) or ray")
    st.add_argument("--workers", type=int, default=None, help="local worker processes (default: every core)")
    st.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    st.add_argument("--rerun-changed", action="store_true",
                    help="retrain finished runs whose stored config differs from the study's (default: refuse)")
    st.add_argument("--no-progress", action="store_true")
    es = rl_sub.add_parser("es", help="evolution strategies (sb3-contrib ARS) for compact policies")
    es.add_argument("--env", default="Swimmer-v5")
    es.add_argument("--policy", default="kama", help="kama, toeplitz or mlp")
    es.add_argument("--hidden", type=int, default=16)
    es.add_argument("--rotations", type=int, default=50)
    es.add_argument("--action-gain", type=float, default=0.01, help="initial gain of the action layer")
    es.add_argument("--angle-gain", default=DEFAULT_ANGLE_GAIN, type=_gain,
                    help="KAMA angle gain: 'dense' (a dense layer's step size) or a number; 1.0 is the paper's "
                    "(default: %(default)s)")
    es.add_argument("--plane-sampler", default=DEFAULT_PLANE_SAMPLER,
                    help="KAMA planes: iid (the paper's) or live (no dead rotation) (default: %(default)s)")
    es.add_argument("--steps", type=int, default=200_000)
    es.add_argument("--population", type=int, default=16, help="candidates per iteration (antithetic pairs)")
    es.add_argument("--top", type=int, default=None, help="directions kept per update (default: all)")
    es.add_argument("--sigma", type=float, default=0.05, help="perturbation standard deviation")
    es.add_argument("--lr", type=float, default=0.02)
    es.add_argument("--no-obs-norm", action="store_true", help="disable observation normalization")
    es.add_argument("--eval-every", type=int, default=10_000)
    es.add_argument("--eval-episodes", type=int, default=3)
    es.add_argument("--workers", type=int, default=1, help="candidate-evaluation workers (processes or Ray actors)")
    es.add_argument("--backend", default="local", help="local (worker processes) or ray (Ray actors)")
    es.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--out", default=None, help="output folder (default: results/es/ENV-POLICY-sSEED)")
    rp = rl_sub.add_parser("report", help="figures, CSVs and report.md from finished study folders (no training)")
    rp.add_argument("--study", nargs="+", required=True, metavar="DIR",
                    help="study folders written by `kama rl study` (each holds study.json)")
    rp.add_argument("--out", required=True, help="output folder")
    return parser


def _error(e: BaseException, out: str | None = None) -> int:
    """One line on stderr for a user's mistake or an unusable output folder; exit status 2."""
    if isinstance(e, OSError):
        where = f" (--out {out})" if out else ""
        name = f": {e.filename}" if e.filename else ""
        print(f"kama: error: {e.strerror or e}{name}{where}", file=sys.stderr)
    else:
        print(f"kama: error: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kama`` command; returns the exit status (2: bad input, 130: interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("kama: interrupted; rerun the same command to resume (finished work is kept)", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    from ._optional import MissingDependencyError
    from .experiments.runner import load_experiments, reproduce
    from .records import FolderBusyError

    if args.command == "rl":
        return _rl(args)
    if args.command == "list":
        for name, exp in load_experiments().items():
            print(f"{name}: {exp.title}")
            for mode, cfg in exp.configs.items():
                print(f"  {mode}: {cfg}")
        return 0
    try:
        report = reproduce(mode=args.mode, only=args.only, out=args.out, overrides=_parse_set(args.set),
                           force=args.force, progress=not args.no_progress)
    except (ValueError, TypeError, OSError, FolderBusyError, MissingDependencyError) as e:
        return _error(e, args.out)
    print(f"report: {report}")
    return 0


def _rl(args: argparse.Namespace) -> int:
    from .records import FolderBusyError

    try:
        from .rl.study import load_study_config, run_study
        from .rl.train import RunConfig, train
    except ImportError as e:  # pragma: no cover - the rl extra is not installed
        print(f"kama: error: {e}; install the rl extra: pip install 'kama-nn[rl]'", file=sys.stderr)
        return 2
    if args.rl_command == "es":
        from .rl.es import ESConfig, train_es

        try:
            es_cfg = ESConfig(env_id=args.env, architecture=args.policy, hidden=args.hidden,
                              num_rotations=args.rotations, action_gain=args.action_gain,
                              angle_gain=args.angle_gain, plane_sampler=args.plane_sampler,
                              total_timesteps=args.steps, population=args.population,
                              n_top=args.top, sigma=args.sigma, learning_rate=args.lr,
                              normalize_observations=not args.no_obs_norm, eval_every=args.eval_every,
                              eval_episodes=args.eval_episodes, workers=args.workers, backend=args.backend,
                              ray_address=args.ray_address, seed=args.seed)
            out = args.out or f"results/es/{args.env}-{args.policy}-s{args.seed}"
            train_es(es_cfg, out)
        except (ValueError, TypeError, OSError, FolderBusyError) as e:
            return _error(e, args.out)
        print(f"run written to {out}")
        return 0
    if args.rl_command == "report":
        from .experiments.rl_policies import report
        from .records import atomic_write_text, provenance

        try:
            studies = [(load_study_config(Path(d) / "study.json"), Path(d)) for d in args.study]
            prov = provenance()  # before the report rewrites its own files: a clean tree stays clean
            body = report(studies, Path(args.out))
            head = (f"# RL study report\n\nFrom {', '.join(args.study)}; generated {prov['time_utc']} at commit "
                    f"`{prov['git_commit']}` (kama {prov['kama_version']}).\n\n")
            atomic_write_text(Path(args.out) / "report.md", head + body + "\n")
        except (ValueError, TypeError, OSError) as e:
            return _error(e, args.out)
        print(f"report: {Path(args.out) / 'report.md'}")
        return 0
    if args.rl_command == "study":
        try:
            study = load_study_config(args.config)
            folders = run_study(study, args.out, backend=args.backend, workers=args.workers,
                                ray_address=args.ray_address, progress=not args.no_progress,
                                rerun_changed=args.rerun_changed)
        except (ValueError, TypeError, OSError, FolderBusyError) as e:
            return _error(e, args.out)
        print(f"{len(folders)} runs under {args.out}")
        return 0
    try:
        algo_kwargs = json.loads(args.algo_kwargs)
        cfg = RunConfig(env_id=args.env, algo=args.algo, architecture=args.policy, hidden=args.hidden,
                        num_rotations=args.rotations, structured_critic=args.structured_critic,
                        learn_planes=args.learn_planes, angle_gain=args.angle_gain,
                        plane_sampler=args.plane_sampler,
                        normalize=RunConfig.normalize if args.normalize is None else args.normalize,
                        total_timesteps=args.steps, eval_every=args.eval_every,
                        eval_episodes=args.eval_episodes, seed=args.seed, algo_kwargs=algo_kwargs)
        out = args.out or f"results/rl/{args.env}-{args.algo}-{args.policy}-s{args.seed}"
        train(cfg, out)
    except (ValueError, TypeError, OSError, FolderBusyError) as e:
        return _error(e, args.out)
    print(f"run written to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

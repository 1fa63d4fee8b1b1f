"""The experiment registry, and running one registered experiment in a work directory.

An experiment is a name, a one-line description, a config dataclass and a run function. `run_command` is what
`jaxalign run NAME --workdir DIR [key=value ...]` does (launch/cli.py calls it), and this module is also its own
entry point, so a child process can run an experiment without the command line package:

    python -m jaxalign.registry NAME --workdir DIR [key=value ...]

Both join a multi-process run from the environment first (`jaxalign.distributed.initialize_from_env`), apply the
overrides (`jaxalign.overrides`), append everything the run prints to DIR/logs/run.log, print the scalar results
as JSON, and turn a bad command line or configuration into one `jaxalign: error: ...` line and exit code 2.

Importing this module imports no JAX: the experiments are loaded by name only when one is asked for, so listing
them stays cheap.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import io
import os
import shlex
import sys
import time
import traceback
from typing import Any, Callable

from jaxalign.overrides import ConfigError, apply_overrides, config_help, file_overrides


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    default_config: Callable[[], Any]
    run: Callable[[Any, str], dict]


def _arith_task(name: str, task: str) -> Callable[[], Experiment]:
    """A built-in ARITH task variant: the main job with an imperfect judge (`arith_dpo.TASK_VARIANTS`)."""

    def load() -> Experiment:
        from jaxalign.experiments import arith_dpo

        return Experiment(name=name, description=EXPERIMENTS[name][0],
                          default_config=lambda: arith_dpo.task_config(arith_dpo.ArithDPOConfig(), task),
                          run=arith_dpo.run)

    return load


def _iterative(name: str) -> Callable[[], Experiment]:
    """Online DPO, DNO-Prct or APO on ARITH (`iterative_dpo.PRESETS`)."""

    def load() -> Experiment:
        from jaxalign.experiments import iterative_dpo

        return Experiment(name=name, description=EXPERIMENTS[name][0],
                          default_config=lambda: iterative_dpo.preset(name), run=iterative_dpo.run)

    return load


def _module_experiment(name: str, module: str, config: str) -> Callable[[], Experiment]:
    """An experiment whose module exposes a config dataclass `config` and `run(cfg, workdir)`."""

    def load() -> Experiment:
        loaded = importlib.import_module(module)
        return Experiment(name=name, description=EXPERIMENTS[name][0], default_config=getattr(loaded, config),
                          run=loaded.run)

    return load


# (description, loader): importing the registry stays cheap and `jaxalign list` does not import JAX models.
EXPERIMENTS: dict[str, tuple[str, Callable[[], Experiment]]] = {
    "arith_dpo": (
        "SFT on noisy ARITH demonstrations, then DPO on on-policy oracle-labelled pairs (the main job)",
        _module_experiment("arith_dpo", "jaxalign.experiments.arith_dpo", "ArithDPOConfig"),
    ),
    "arith_dpo_length_bias": (
        "the main job with verbose demonstrations (0-3 neutral recaps of the answer) and a length-biased judge "
        "(+0.5 score per completion token): longer responses win more often than their quality warrants",
        _arith_task("arith_dpo_length_bias", "length_bias"),
    ),
    "arith_dpo_verbose": (
        "the length-bias task's control: the same verbose demonstrations, pairs judged by the oracle alone",
        _arith_task("arith_dpo_verbose", "verbose"),
    ),
    "arith_dpo_noisy_labels": (
        "the main job with 30% of the preference pairs flipped (label noise for cDPO / robust DPO)",
        _arith_task("arith_dpo_noisy_labels", "noisy_labels"),
    ),
    "curry_dpo": (
        "Curry-DPO on ARITH: best-vs-rest pairs from K graded samples in easy-to-hard stages, each stage's policy "
        "the next stage's reference (vs. DPO on all pairs)",
        _module_experiment("curry_dpo", "jaxalign.experiments.curry_dpo", "CurryDPOConfig"),
    ),
    "online_dpo": (
        "online/iterative DPO on ARITH: sample 8 per prompt from the current policy, judge (graded 0-6), best vs "
        "worst, DPO with the previous iterate as reference, 4 iterations",
        _iterative("online_dpo"),
    ),
    "dno": (
        "DNO-Prct on ARITH: online DPO plus the gold answer as teacher, margin filters 2 / 1, replay of earlier "
        "pairs (30% / 15%), the best iterate on validation",
        _iterative("dno"),
    ),
    "apo": (
        "APO on ARITH: online DPO with a Nesterov-extrapolated reference (alpha 0.3) in the loss and for sampling "
        "(token-level logits; weights or the plain iterate selectable); alpha=0 is online DPO exactly",
        _iterative("apo"),
    ),
    "oreo_arith": (
        "OREO on ARITH: soft-Bellman critic and actor from offline SFT trajectories (critic first), value-guided "
        "beam search over steps vs greedy, V(s_0) vs the empirical success rate",
        _module_experiment("oreo_arith", "jaxalign.experiments.oreo_arith", "OreoArithConfig"),
    ),
    "step_dpo": (
        "Step-DPO on ARITH: prompt = x + the correct prefix steps, rejected = the first wrong step, chosen = a "
        "correct step sampled from the SFT policy; sigmoid DPO (beta 0.4) on the step tokens only, vs "
        "response-level DPO with the same number of pairs and steps",
        _module_experiment("step_dpo", "jaxalign.experiments.step_dpo", "StepDPOConfig"),
    ),
    "drpo_arith": (
        "DR-PO vs PPO on ARITH: PPO whose rollouts start, with prob 0.5, from a teacher-forced prefix of the gold "
        "solution (loss masked on it), against plain PPO with the same rollouts and updates from the same SFT "
        "policy, 3 RL seeds",
        _module_experiment("drpo_arith", "jaxalign.experiments.drpo_arith", "DRPOArithConfig"),
    ),
    "ddo_arith": (
        "DDO on ARITH: the policy/reference likelihood ratio as a discriminator between gold solutions and the "
        "reference's own samples (beta 1, alpha 1), 2 rounds with ref <- theta, vs continued SFT (MLE) on the same "
        "gold data and steps from the same SFT policy",
        _module_experiment("ddo_arith", "jaxalign.experiments.ddo_arith", "DDOArithConfig"),
    ),
    "dpa_arith": (
        "DPA on ARITH (verbose task): direction-conditioned SFT, then rejection-sampling fine-tuning on the argmax "
        "of v.(correctness, conciseness) among 8 samples with the direction as a prompt prefix, 2 iterations; "
        "accuracy and length per direction vs SFT",
        _module_experiment("dpa_arith", "jaxalign.experiments.dpa_arith", "DPAArithConfig"),
    ),
    "trpa_arith": (
        "TRPA on ARITH: rule-based levels (correct/wrong/incomplete/malformed) of 8 SFT samples per prompt, "
        "mean-log-ratio pairs with kappa 2.5 and a k3-KL trust region to the sampling policy, vs sigmoid DPO on "
        "best-vs-worst pairs of the same samples; held-out accuracy and sampled KL(pi||pi_old)",
        _module_experiment("trpa_arith", "jaxalign.experiments.trpa_arith", "TRPAConfig"),
    ),
    "brain_arith": (
        "BRAIn on ARITH: self-normalised posterior weights (graded judge / 6) over all 8 SFT samples per prompt, "
        "vs DPO on best-vs-worst pairs of the same samples; held-out accuracy and sampled KL",
        _module_experiment("brain_arith", "jaxalign.experiments.brain_arith", "BRAInConfig"),
    ),
    "dpo_files": (
        "DPO on your own pairwise JSONL/Parquet file from a Hugging Face or `jaxalign convert` checkpoint, "
        "evaluated on held-out pairs; optional LoRA and Hugging Face export",
        _module_experiment("dpo_files", "jaxalign.experiments.dpo_files", "DPOFilesConfig"),
    ),
    "oreo_files": (
        "OREO on your own trajectory JSONL/Parquet file (prompt, steps, terminal reward) from a Hugging Face or "
        "`jaxalign convert` checkpoint, value and policy losses on held-out trajectories; optional LoRA and export",
        _module_experiment("oreo_files", "jaxalign.experiments.oreo_files", "OreoFilesConfig"),
    ),
    "ddp_gridworld": (
        "agent (a), deep: stock-augmented quantile DQN greedy w.r.t. CVaR_0.1 / homeostatic objectives on a "
        "stochastic gridworld vs the tabular optimum and QR-DQN (10,000 evaluation episodes)",
        _module_experiment("ddp_gridworld", "agents.distributional_dp.experiment", "DDPGridworldConfig"),
    ),
    "deceptive_paths": (
        "agent (c): GraphSAGE + PPO deceptive path planning on grid maps (exaggeration or ambiguity bonus) vs the "
        "honest path and Masters-Sardina pi_d4; unseen and larger maps, budget curve, moved decoy, throughput",
        _module_experiment("deceptive_paths", "agents.deceptive_paths.experiment", "DeceptivePathsConfig"),
    ),
    "pdppo_lot_sizing": (
        "agent (b): PPO vs PDPPO (dual critics, min(V(s), V_post(s^x))) on stochastic lot-sizing, paired seeds and "
        "one shared config, vs the base-stock rule on held-out demand (and the exact optimum on instance=tiny)",
        _module_experiment("pdppo_lot_sizing", "agents.pdppo.experiment", "PDPPOLotSizingConfig"),
    ),
    "jssp_cp": (
        "agent (d): job-shop dispatching by a size-agnostic attention policy, imitation of CP-SAT then PPO on the "
        "makespan; vs SPT/LPT/MWKR/MOR/FIFO and CP-SAT on held-out generated and Taillard instances",
        _module_experiment("jssp_cp", "agents.jssp_cp.experiment", "JSSPCPConfig"),
    ),
    "ppo_cartpole": (
        "PPO on the JAX CartPole-v1 (vmapped envs, one jitted scan), evaluated over 100 greedy episodes",
        _module_experiment("ppo_cartpole", "rl.experiments.ppo_cartpole", "PPOCartPoleConfig"),
    ),
    "ppo_gymnasium": (
        "PPO on any gymnasium environment with discrete actions (env=Acrobot-v1, ...), stepped on the host with the "
        "jitted policy and learner; checkpointed and resumable per chunk, evaluated greedily",
        _module_experiment("ppo_gymnasium", "rl.experiments.ppo_gymnasium", "PPOGymnasiumConfig"),
    ),
    "dqn_gymnasium": (
        "double DQN on any gymnasium environment with discrete actions (env=Acrobot-v1, ...), stepped on the host "
        "with the jitted policy and learner; replay buffer checkpointed per chunk, resumable, evaluated greedily",
        _module_experiment("dqn_gymnasium", "rl.experiments.dqn_gymnasium", "DQNGymnasiumConfig"),
    ),
    "diffusion_gmm": (
        "a small MLP diffusion model trained on an exact 2-D Gaussian mixture (RL harness: chunked, resumable); "
        "MMD^2 of DDIM / DPM-Solver(++) samples vs the exact score's at each NFE",
        _module_experiment("diffusion_gmm", "jaxalign.experiments.diffusion_gmm", "DiffusionGMMConfig"),
    ),
    "diffusion_preference": (
        "diffusion preference fine-tuning: a UNet base on 16x16 procedural shapes (task=shapes, the default) or the "
        "diffusion_gmm base (task=vectors), pairs labelled by a programmatic reward, fine-tuned with SFT, "
        "Diffusion-DPO, SmPO, DSO (DPO, DRO), Diffusion-DRO, D3PO and (shapes) PatchDPO from the same base and "
        "budget; reward gain and MMD^2 to the base over seeds (resumable per unit)",
        _module_experiment("diffusion_preference", "jaxalign.experiments.diffusion_preference",
                           "DiffusionPreferenceConfig"),
    ),
}


def register_experiment(name: str, description: str, default_config: Callable[[], Any],
                        run: Callable[[Any, str], dict]) -> None:
    """Add an experiment from your own module (a plugin, `jaxalign.plugins`): `default_config()` returns its config
    dataclass (every field overridable as key=value), `run(cfg, workdir)` runs or resumes it and returns its
    results. A name already taken is refused, so a plugin never silently replaces a built-in experiment."""
    if name in EXPERIMENTS:
        raise ValueError(f"experiment {name!r} is already registered; choose another name")
    EXPERIMENTS[name] = (description, lambda: Experiment(name=name, description=description,
                                                          default_config=default_config, run=run))


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name][1]()


def configure(name: str, overrides: list[str]) -> tuple[Experiment, Any]:
    """The experiment and its default config with `overrides` applied: every command-line mistake (an unknown
    experiment, key or value) surfaces here, before anything runs or is written."""
    experiment = get_experiment(name)
    return experiment, apply_overrides(experiment.default_config(), list(overrides))


# ------------------------------------------------------------------------------------------------- running one


class _Tee(io.TextIOBase):
    """A text stream that writes to the terminal and to the run's log file. The log is a copy: when it cannot be
    written (a full disk), the run says so once on the terminal and goes on without it, so the error the run then
    meets (its next checkpoint or results file) is the one reported."""

    def __init__(self, terminal, log):
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        self.terminal.write(text)
        if self.log is not None:
            try:
                self.log.write(text)
            except OSError as e:
                self.log = None
                self.terminal.write(f"jaxalign: warning: the run log stops here: {e.strerror}\n")
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        if self.log is not None:
            with contextlib.suppress(OSError):
                self.log.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()


@contextlib.contextmanager
def run_log(workdir: str, argv: list[str]):
    """Append everything a run prints (stdout and stderr: progress, warnings, the summary, an error's traceback) to
    WORKDIR/logs/run.log as well as the terminal, so a run directory keeps its own log across resumes. Process N > 0
    of a multi-process run writes logs/run.process_N.log. On an object store the log is staged locally and written
    up when the run ends (`jaxalign.paths.appending`)."""
    from jaxalign import paths

    process = os.environ.get("JAXALIGN_PROCESS_ID", "0")
    name = "run.log" if process == "0" else f"run.process_{process}.log"
    created = not paths.exists(workdir)
    paths.makedirs(paths.join(workdir, "logs"))
    try:
        with paths.appending(paths.join(workdir, "logs", name)) as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} jaxalign {shlex.join(argv)}\n")
            stdout, stderr = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _Tee(stdout, log), _Tee(stderr, log)
            try:
                yield
            except BaseException:
                with contextlib.suppress(OSError):
                    log.write(traceback.format_exc())
                raise
            finally:
                sys.stdout, sys.stderr = stdout, stderr
    except BaseException:
        if created and refused_before_claim(workdir):
            paths.rmtree(workdir)
        raise


def refused_before_claim(workdir: str) -> bool:
    """Whether a failed run stopped before claiming `workdir` (no config.json: an experiment's own checks, such as
    a batch that does not split over the mesh, refused it) and left nothing but its log there. A directory this run
    created for nothing is then removed, so the corrected command starts clean; `--debug` shows the traceback."""
    from jaxalign import paths

    if paths.exists(paths.join(workdir, "config.json")):
        return False
    return all(entry == "logs" for entry in paths.listdir(workdir))


def run_experiment(name: str, workdir: str, overrides: list[str]) -> dict:
    """Run (or resume) experiment `name` in `workdir` with `overrides`; print its scalar results and return all.

    A rejected command line (unknown experiment, key or value) raises before the work directory is created; once
    the run starts, everything it prints, an error's traceback included, also goes to WORKDIR/logs/run.log under
    a header naming the equivalent `jaxalign run` command.
    """
    from jaxalign.distributed import initialize_from_env
    from jaxalign.rundir import strict_json_text
    from jaxalign.tracking import ENV_VAR as TRACKING_ENV
    from jaxalign.tracking import check_workdir as check_tracking_workdir
    from jaxalign.tracking import finish as tracking_finish
    from jaxalign.tracking import parse_tracking
    from jaxalign.train.preference import objective_lines

    initialize_from_env()  # before anything touches JAX devices: a multi-process run joins its peers here
    trackers = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "tracking"]
    experiment, cfg = configure(name, [o for o in overrides if o.split("=", 1)[0].strip() != "tracking"])
    if trackers:  # how the run is watched, not what it computes: never part of config.json
        check_tracking_workdir(parse_tracking(trackers[-1]), workdir)
    check_mesh_fits(cfg)
    previous = os.environ.get(TRACKING_ENV)
    if trackers:
        os.environ[TRACKING_ENV] = trackers[-1]  # for this run and the processes it starts
    try:
        with run_log(workdir, ["run", name, "--workdir", workdir, *overrides]):
            for line in objective_lines(cfg):  # what each preference phase optimises, every value resolved
                print(f"objective of {line}", file=sys.stderr)
            results = experiment.run(cfg, workdir)
            tracking_finish(workdir, dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None)
            summary = {k: v for k, v in results.items() if not isinstance(v, (dict, list))}
            print(strict_json_text(summary, indent=2, sort_keys=True))
    finally:
        if trackers and previous is None:
            os.environ.pop(TRACKING_ENV, None)
        elif trackers:
            os.environ[TRACKING_ENV] = previous
    return results


def check_mesh_fits(cfg: Any) -> None:
    """A config's `mesh` section that does not fit this machine's devices is refused here, before the work
    directory exists, rather than by the experiment once it has been created."""
    shape = getattr(getattr(cfg, "mesh", None), "shape", None)
    if callable(shape):
        import jax

        shape(jax.device_count())


def report_errors(command: Callable[[], Any], debug: bool = False) -> int:
    """Run `command`; a refusal (`refusal_line`) becomes one 'jaxalign: error:' line on stderr and exit code 2 (the
    traceback is in the run's log, not on the terminal, unless `debug`), success exit code 0."""
    try:
        command()
    except Exception as e:  # noqa: BLE001 - anything that is not a refusal is re-raised with its traceback
        line = refusal_line(e)
        if line is None:
            raise
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"jaxalign: error: {line}", file=sys.stderr)
        return 2
    return 0


def error_line(error: BaseException) -> str:
    """The error's message on one line: a terminal refusal is one line whatever the message's own layout."""
    return " ".join(str(error).split())


# Write failures that are the machine's state, not a bug: the user fixes them and re-runs.
WRITE_FAILURES = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
                  errno.EFBIG: "free some space", errno.EROFS: "choose a writable --workdir",
                  errno.EACCES: "choose a writable --workdir", errno.EPERM: "choose a writable --workdir"}


def write_failure(error: BaseException | None) -> OSError | None:
    """The full-disk, read-only or permission OSError behind `error` (itself, or its cause or context, as when a
    checkpointing library wraps it), if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def refusal_line(error: BaseException) -> str | None:
    """The one line a refused command prints, or None for an error that deserves its traceback: a bad configuration
    or value (ConfigError, ValueError) is its own message; a full disk, a read-only or unwritable directory names
    the file, the reason and what to do (the checkpoints already saved are complete: saves are atomic)."""
    if isinstance(error, (ConfigError, ValueError)):
        return error_line(error)
    failure = write_failure(error)
    if failure is None:
        return None
    where = failure.filename if failure.filename is not None else "a file of the run"
    advice = WRITE_FAILURES[failure.errno]
    then = (", then re-run the same command: it resumes from the last complete checkpoint"
            if advice == "free some space" else "")
    return error_line(OSError(f"cannot write {where}: {failure.strerror} ({errno.errorcode[failure.errno]}); "
                              f"{advice}{then}"))


def run_command(name: str, workdir: str, overrides: list[str], debug: bool = False,
                on_nonfinite: str | None = None, config_file: str | None = None) -> int:
    """`jaxalign run NAME --workdir DIR [--config FILE] [--on-nonfinite P] [key=value ...]`: `run_experiment` with
    its errors reported; the exit code."""
    return report_errors(lambda: run_experiment(
        name, workdir, run_overrides(name, overrides, on_nonfinite, config_file)), debug)


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of a run: NAME, --workdir DIR, --on-nonfinite and key=value overrides (shared with `jaxalign
    run`)."""
    parser.add_argument("name")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="a JSON or YAML file of config keys (any run's config.json works); key=value "
                             "overrides on the command line win over it")
    parser.add_argument("--on-nonfinite", choices=("stop", "skip-batch"), default=None,
                        help="what every training phase does with a batch whose loss or gradient norm is not finite: "
                             "stop the run (the default) or skip the batch's update and count it; sets every "
                             "phase's on_nonfinite field, so it is recorded in config.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (dotted keys for nested fields)")
    return parser


def wants_experiment_help(run_argv: list[str]) -> bool:
    """`NAME --help` (the arguments after `run`): the help of that experiment's config, not argparse's usage."""
    return bool(run_argv) and not run_argv[0].startswith("-") and any(a in ("-h", "--help") for a in run_argv[1:])


def fields_named(cfg: Any, name: str, prefix: str = "") -> list[str]:
    """The dotted paths of every field called `name` in a config dataclass tree."""
    paths = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name == name:
            paths.append(prefix + field.name)
        elif dataclasses.is_dataclass(value):
            paths += fields_named(value, name, f"{prefix}{field.name}.")
    return paths


def run_overrides(name: str, overrides: list[str], on_nonfinite: str | None = None,
                  config_file: str | None = None) -> list[str]:
    """The overrides of a run, in the order they apply (later ones win): the keys of `--config FILE` that differ
    from the defaults, then `--on-nonfinite=P` as `PHASE.on_nonfinite=P` for every phase of the experiment that has
    the setting, then the user's key=value overrides (which may still set one phase differently)."""
    if on_nonfinite is None and config_file is None:
        return list(overrides)
    defaults = get_experiment(name).default_config()
    from_file = [] if config_file is None else file_overrides(defaults, config_file)
    if on_nonfinite is None:
        return from_file + list(overrides)
    paths = fields_named(defaults, "on_nonfinite")
    if not paths:
        raise ValueError(f"experiment {name!r} has no training phase with an on_nonfinite setting; "
                         f"--on-nonfinite applies to the LM phases (e.g. arith_dpo, dpo_files)")
    return from_file + [f"{path}={on_nonfinite}" for path in paths] + list(overrides)


def experiment_help(name: str) -> str:
    """`jaxalign run NAME --help`: the experiment, then every config key with its type, default and description."""
    experiment = get_experiment(name)
    return config_help(name, experiment.description, experiment.default_config())


def add_debug_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print its full traceback too (otherwise only in WORKDIR/logs/run.log)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m jaxalign.registry NAME --workdir DIR [key=value ...]`: exactly `jaxalign run`'s behaviour."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_debug_argument(add_run_arguments(argparse.ArgumentParser(
        prog="python -m jaxalign.registry", description="run (or resume) a registered experiment in a work directory")))
    if wants_experiment_help(argv):
        return report_errors(lambda: print(experiment_help(argv[0])))
    args, extra = parser.parse_known_args(argv)
    from jaxalign.plugins import load_plugins

    try:  # a child process (`jaxalign local`, a sweep point) imports the plugins its parent named
        load_plugins()
    except ValueError as e:
        print(f"jaxalign: error: {error_line(e)}", file=sys.stderr)
        return 2
    return run_command(args.name, args.workdir, list(args.overrides) + extra, args.debug, args.on_nonfinite,
                       args.config)


if __name__ == "__main__":
    sys.exit(main())

"""The controller's own cost: trials per second through it, and its overhead per trial.

    python benchmarks/orchestrator_overhead.py                       # 1, 4 and 16 actors, sleep 0 and 0.5 s
    python benchmarks/orchestrator_overhead.py --actors 4 --sleep-s 0.2 --repeats 5

Every trial is the registered `noop` technique: the actor sleeps `sleep_s` and returns a
synthetic record, so the trial costs the controller what any trial does (an Optuna ask, a Ray
call, an MLflow run with metrics, params, tags and the record as an artifact, an Optuna tell,
the front's tags) and nothing else. The real `Controller` runs it on real Ray actors, with Optuna
and MLflow on SQLite files under a temporary folder, the random sampler.

Figures per actor count (k) and sleep:
- `trials_per_s`: trials finished / the trial loop's wall time (from the first ask to the last
  trial recorded; the actors' start and the final front artifacts are outside it).
- `overhead_ms_per_trial`: the controller's own time per trial: the loop's wall time minus the
  time it spent blocked in `ray.wait` (`SweepResult.overhead_ms_per_trial`).
- `ideal_trials_per_s`: k / sleep_s, what actors that never wait for the controller would reach.

The peer is Ray Tune (`tune.Tuner` with `OptunaSearch` on Optuna's RandomSampler, the same two
objectives, `max_concurrent_trials=k`, the same CPU share per trial) on the same objective: sleep,
then report the same synthetic metrics. Its figure is trials / `Tuner.fit()` wall time; Tune keeps
its study in memory and writes its own result files, where paretoray writes SQLite and MLflow.

`--optuna journal` keeps the study in Optuna's journal file (`--storage X.log`) instead of SQLite:
appending JSON lines skips the SQL layer, which is most of Optuna's share of a trial.

`--tracking server` puts MLflow behind an `mlflow server` on loopback, as on a cluster's head:
the controller then makes HTTP calls and the server process does the database work.

A warm-up run per configuration is discarded, then `--repeats` runs; the median is reported. The
last stdout line is one JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny: the offline tiny model the actors load (noop never runs it)

import ray  # noqa: E402

from paretoray.orchestrator.controller import Controller  # noqa: E402
from paretoray.orchestrator.spec import parse  # noqa: E402
from paretoray.orchestrator.stores import resolve_stores  # noqa: E402

OBJECTIVES = {"latency_ms_per_token": "minimize", "accuracy": "maximize"}


def noop_metrics(knob: float) -> dict[str, float]:
    # The noop technique's curve, written out: calling `Noop` from Tune's trainable makes each of
    # its workers import paretoray's technique stack (torch, transformers), which cut Tune's
    # throughput 3x in a trial run and would measure that import, not Tune.
    latency_ms = 1.0 + 9.0 * knob**2  # the noop technique's curve
    return {"accuracy": knob, "latency_ms_per_token": latency_ms}


def run_paretoray(model_dir: Path, home: Path, name: str, actors: int, trials: int, sleep_s: float, cpus: float,
                  tracking_uri: str | None = None, storage: str | None = None) -> dict:
    spec = parse(
        {
            "name": name,
            "model": {"id": str(model_dir), "dtype": "float32"},
            "workload": {"task": "passkey", "context_lengths": [128], "samples_per_length": 1},
            "techniques": {"noop": {"sleep_s": sleep_s, "knob": {"low": 0.0, "high": 1.0}}},
            "objectives": OBJECTIVES,
            "sampler": {"name": "random", "seed": 0},
            "trials": trials,
            "actors": {"count": actors, "num_cpus": cpus},
        },
        f"<{name}>",
    )
    started = time.perf_counter()
    from paretoray.dashboards import live_report_html

    result = Controller(spec, resolve_stores(tracking_uri, storage, home=str(home)), report=live_report_html).run(progress=False)
    return {
        "trials": result.trials_run,
        "trials_per_s": result.trials_run / result.loop_s,
        "overhead_ms_per_trial": result.overhead_ms_per_trial,
        "end_to_end_s": time.perf_counter() - started,
    }


def store_breakdown(home: Path, trials: int, tracking_uri: str | None = None, storage: str | None = None) -> dict[str, dict[str, float]]:
    """Where a trial's controller time goes: the same store calls the controller makes per trial,
    timed one by one outside Ray, with the SQL statements each sends (counted per database)."""
    from collections import defaultdict

    import optuna
    import sqlalchemy

    from paretoray.orchestrator.recorder import Recorder

    statements: dict[str, int] = defaultdict(int)

    def count(connection, *_args) -> None:
        statements[connection.engine.url.database.rsplit("/", 1)[-1]] += 1

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", count)
    stores = resolve_stores(tracking_uri, storage, home=str(home))
    recorder = Recorder(stores, "breakdown")
    spec_json = {"model": {"id": "m", "dtype": "auto"}, "sampler": {"name": "random"}, "trials": trials,
                 "workload": {"task": "passkey", "context_lengths": [128], "samples_per_length": 1},
                 "actors": {"count": 1}, "techniques": {"noop": {}}, "objectives": OBJECTIVES, "constraints": []}
    parent = recorder.start_sweep(spec_json, None)
    study = optuna.create_study(study_name="breakdown", storage=stores.optuna_storage(), directions=list(OBJECTIVES.values()),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    seconds: dict[str, float] = defaultdict(float)
    counted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def step(name: str, call):
        before, started = dict(statements), time.perf_counter()
        result = call()
        seconds[name] += time.perf_counter() - started
        for database, n in statements.items():
            counted[name][database] += n - before.get(database, 0)
        return result

    def ask():
        trial = study.ask()
        trial.suggest_categorical("technique", ["noop"])
        trial.suggest_float("noop.knob", 0.0, 1.0)
        return trial

    for _ in range(trials):
        trial = step("optuna ask + suggest", ask)
        metrics = noop_metrics(trial.params["noop.knob"])
        record = {"trial": trial.number, "technique": "noop", "label": "noop", "status": "ok", "metrics": metrics,
                  "params": {"knob": trial.params["noop.knob"], "sleep_s": 0.0}, "actor": {"pid": 1, "node_ip": "127.0.0.1"},
                  "env": {"device": "cpu", "torch": "x", "ray": ray.__version__}}
        run_id = step("mlflow trial run", lambda: recorder.log_trial(parent, trial.number, record, spec_json, may_exist=False))

        def attributes():  # what SweepBook.finish stores on the trial
            for key, value in (("mlflow_run_id", run_id), ("technique", "noop"), ("label", "noop"),
                               ("params", record["params"]), ("actor", record["actor"]), ("metrics", metrics)):
                trial.set_user_attr(key, value)

        step("optuna user attrs (6)", attributes)
        step("optuna tell", lambda: study.tell(trial, [metrics[name] for name in OBJECTIVES]))
        step("front tags + parent counts", lambda: recorder.update_front(parent, study, list(OBJECTIVES), artifacts=False))
    sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", count)
    return {name: {"ms_per_trial": 1000 * seconds[name] / trials,
                   **{f"sql_{db}": n / trials for db, n in counted[name].items() if n}} for name in seconds}


def run_tune(folder: Path, actors: int, trials: int, sleep_s: float, cpus: float) -> dict:
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    def objective(config: dict) -> dict[str, float]:
        time.sleep(sleep_s)
        return noop_metrics(config["knob"])

    search = OptunaSearch(
        metric=list(OBJECTIVES), mode=["min", "max"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    tuner = tune.Tuner(
        tune.with_resources(objective, {"cpu": cpus}),
        param_space={"knob": tune.uniform(0.0, 1.0)},
        # reuse_actors: one trainable actor per slot, as paretoray keeps one actor per slot
        tune_config=tune.TuneConfig(search_alg=search, num_samples=trials, max_concurrent_trials=actors, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(folder), verbose=0),
    )
    started = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - started
    assert len(results) == trials and not results.errors, results.errors
    return {"trials": trials, "trials_per_s": trials / wall, "end_to_end_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sleep-s", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--trials-per-actor", type=int, default=4, help="trials per run = max(--min-trials, this x actors)")
    parser.add_argument("--min-trials", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="Ray's CPUs, shared by the actors")
    parser.add_argument("--no-tune", action="store_true", help="skip the Ray Tune peer")
    parser.add_argument("--breakdown", action="store_true",
                        help="only time the store calls of a trial one by one, outside Ray (where the overhead goes)")
    parser.add_argument("--optuna", choices=["sqlite", "journal"], default="sqlite",
                        help="Optuna's storage: SQLite (the default store) or its journal file (--storage X.log)")
    parser.add_argument("--tracking", choices=["sqlite", "server"], default="sqlite",
                        help="MLflow on a SQLite file (default), or an `mlflow server` on loopback (as on a cluster's head)")
    args = parser.parse_args()

    def journal(folder: Path, tag: str) -> str | None:  # one journal file per run: a journal replays whole on load
        return str(folder / f"optuna-{tag}.log") if args.optuna == "journal" else None


    from tests.tiny import save_tiny_llama

    folder = Path(tempfile.mkdtemp(prefix="orchestrator-overhead-"))
    model_dir = save_tiny_llama(folder / "tiny-llama")
    server = None
    if args.tracking == "server":
        from tests.localcluster import start_mlflow_server

        server = start_mlflow_server(folder / "mlflow-server")
    if args.breakdown:
        steps = store_breakdown(folder / "stores", max(args.min_trials, 60), server.url if server else None,
                                journal(folder / "stores", "breakdown"))
        if server is not None:
            server.stop()
        for name, figures in steps.items():
            print(f"{name:<28} {figures['ms_per_trial']:7.1f} ms/trial  "
                  + "  ".join(f"{k.removeprefix('sql_')}: {v:.0f} statements" for k, v in figures.items() if k.startswith("sql_")))
        print(f"{'total':<28} {sum(f['ms_per_trial'] for f in steps.values()):7.1f} ms/trial")
        print(json.dumps({"benchmark": "orchestrator_overhead.breakdown", "tracking": args.tracking, "steps": steps}))
        return
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = []
    for sleep_s in args.sleep_s:
        for actors in args.actors:
            trials = max(args.min_trials, args.trials_per_actor * actors)
            share = args.cpus / max(actors, 1)
            for system in ("paretoray", *(() if args.no_tune else ("ray_tune",))):
                runs = []
                for repeat in range(args.repeats + 1):  # the first is the warm-up
                    tag = f"k{actors}-s{sleep_s:g}-r{repeat}"
                    if system == "paretoray":
                        run = run_paretoray(model_dir, folder / "stores", f"bench-{tag}", actors, trials, sleep_s, share,
                                            server.url if server else None, journal(folder / "stores", tag))
                    else:
                        run = run_tune(folder / "tune" / tag, actors, trials, sleep_s, share)
                    if repeat:
                        runs.append(run)
                row = {"system": system, "actors": actors, "sleep_s": sleep_s, "trials": trials,
                       "ideal_trials_per_s": actors / sleep_s if sleep_s else None}
                for key in runs[0]:
                    if key != "trials":
                        row[key] = statistics.median(r[key] for r in runs)
                rows.append(row)
                overhead = f"{row['overhead_ms_per_trial']:.1f} ms/trial" if "overhead_ms_per_trial" in row else ""
                print(f"{system:<10} k={actors:<3} sleep {sleep_s:g} s  {row['trials_per_s']:8.2f} trials/s  {overhead}",
                      flush=True)
    ray.shutdown()
    if server is not None:
        server.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(json.dumps({
        "benchmark": "orchestrator_overhead", "commit": commit, "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "ray": ray.__version__,
        "repeats": args.repeats, "tracking": args.tracking, "optuna": args.optuna, "rows": rows,
    }))


if __name__ == "__main__":
    main()

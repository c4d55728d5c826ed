"""`paretoray`: run sweeps of inference techniques and read their Pareto fronts.

Typical flow:
  paretoray sweep run sweeps/quickstart.yaml      # Ray actors x Optuna, recorded in MLflow
  paretoray results quickstart --pareto           # the front as a table (or --format json|csv)
  paretoray ui                                    # browse every trial in the MLflow UI
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


EXAMPLES = """\
examples:
  paretoray sweep run sweeps/quickstart.yaml
  paretoray sweep run sweeps/quickstart.yaml --trials 20 --name qs-long
  paretoray sweep run sweeps/quickstart.yaml --ray-address auto        # join a running cluster
  paretoray sweep resume quickstart                                     # after an interruption
  paretoray sweep run sweeps/quickstart.yaml --resume-if-exists         # run, or continue if it exists
  paretoray sweep delete qs-long                                        # both stores, after asking
  paretoray results quickstart --pareto --format json
  paretoray report quickstart -o quickstart.html                        # the sweep's report page
  paretoray report quickstart snapkv -o compare.html                    # fronts of several sweeps overlaid
  paretoray techniques                                                  # what can be swept
  paretoray tasks                                                       # what trials are measured on
  paretoray ui --port 5000

stores (every command): --tracking-uri (env PARETORAY_TRACKING_URI) and --storage
(env PARETORAY_STORAGE); by default both are SQLite files under ./paretoray-runs/
(env PARETORAY_HOME moves that folder). A --storage ending in .log is Optuna's journal file.
"""


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (sqlite:///..., postgresql://..., http://HOST:5000)")
    parser.add_argument("--storage", help="Optuna storage URL (sqlite:///..., postgresql://..., or a .log journal file)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, help="total number of finished trials to reach (default: the spec's)")
    parser.add_argument("--ray-address", default=os.environ.get("PARETORAY_RAY_ADDRESS"),
                        help="Ray cluster to join: 'auto', ray://HEAD:10001, ... (default: start a local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    _add_store_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paretoray",
        description="Sweep long-context inference techniques (KV-cache compression, sparse attention, speculative "
        "decoding) on Ray actors with Optuna, record every trial and the Pareto front in MLflow.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sweep = commands.add_parser("sweep", help="run, resume or validate a sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EXAMPLES)
    sweep_commands = sweep.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")
    run = sweep_commands.add_parser("run", help="run a sweep from a YAML spec (see sweeps/ and README: sweep YAML reference)")
    run.add_argument("spec", type=Path, help="sweep YAML file")
    run.add_argument("--name", help="sweep name (default: the spec's `name`, else the file's stem)")
    run.add_argument("--resume-if-exists", action="store_true",
                     help="if a sweep of this name exists, continue it (its stored spec wins) instead of refusing")
    _add_run_options(run)
    resume = sweep_commands.add_parser("resume", help="continue an interrupted sweep from its Optuna storage")
    resume.add_argument("name", help="the sweep's name")
    _add_run_options(resume)
    delete = sweep_commands.add_parser(
        "delete", help="remove a sweep from both stores (asks first)",
        description="Removes the sweep's Optuna study and its MLflow experiment (MLflow keeps the runs in its trash "
        "until `mlflow gc`), so that its name can be used again. Refused while a controller runs the sweep.")
    delete.add_argument("name", help="the sweep's name")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_store_options(delete)
    validate = sweep_commands.add_parser("validate", help="check a sweep YAML without running anything")
    validate.add_argument("spec", type=Path)

    results = commands.add_parser("results", help="print a sweep's trials or its Pareto front")
    results.add_argument("name", help="the sweep's name")
    results.add_argument("--pareto", action="store_true", help="only the Pareto-optimal trials")
    results.add_argument("--format", choices=["table", "json", "csv"], default="table")
    _add_store_options(results)

    report = commands.add_parser(
        "report", help="write a sweep's report (or several sweeps overlaid) as one offline HTML page",
        description="Pareto fronts over every pair of objectives, the front as a sortable table with run links, parameter "
        "effects and importances, speculative-decoding curves and needle-in-a-haystack maps. Several names overlay their "
        "fronts on the objectives they share; sweeps whose model, workload or machine differ are refused unless --force.")
    report.add_argument("names", nargs="+", metavar="NAME", help="one sweep, or several to overlay")
    report.add_argument("-o", "--output", type=Path, required=True, help="the HTML file to write")
    report.add_argument("--force", action="store_true", help="overlay sweeps even if their model, workload or machine differ")
    report.add_argument("--mlflow-url", help="the MLflow UI that run links open (default: the tracking URI if it is a server, "
                        "else http://127.0.0.1:5000, where `paretoray ui` serves)")
    _add_store_options(report)

    commands.add_parser("techniques", help="list the registered techniques and their parameters")
    commands.add_parser(
        "tasks", help="list the registered tasks (workload.task) and their settings",
        description="Every task with its settings: type and range, default, meaning. Settings every task shares "
        "(seed, max_new_tokens, fidelity, query_placement, repeats, min_dense_accuracy) are listed first.")

    draft = commands.add_parser("train-draft", help="build a shallow draft for speculative decoding, distilled from the target",
                                description="Copy the target's embeddings, first --layers layers and head, then distil it on a "
                                "broad offline corpus: prose and code that ship with Python, and the target's own sampled answers "
                                "to requests of many styles. Prints the report, including the acceptance rate of greedy specdec "
                                "(gamma 4) on the shipped templates and on everyday requests the recipe never trains on.")
    draft.add_argument("--model", default="smollm2-135m", help="the target (registry name, path or hub id)")
    # Defaults are the recipe of the registry's smollm2-135m-draft, so the command rebuilds that draft.
    from paretoray.actors.registry import DRAFTS

    recipe = DRAFTS["smollm2-135m-draft"]
    draft.add_argument("--layers", type=int, default=recipe.layers, help=f"decoder layers the draft keeps (default {recipe.layers})")
    draft.add_argument("--steps", type=int, default=recipe.steps, help=f"distillation steps (default {recipe.steps})")
    draft.add_argument("--prompts", type=int, default=recipe.prompts,
                       help=f"chat requests the target answers for the corpus (default {recipe.prompts})")
    draft.add_argument("--passages", type=int, default=recipe.passages,
                       help=f"passages of prose and code the target scores as they are (default {recipe.passages})")
    draft.add_argument("--new-tokens", type=int, default=recipe.new_tokens,
                       help=f"tokens the target samples per prompt (default {recipe.new_tokens})")
    draft.add_argument("--head-vocab", type=int, default=recipe.head_vocab,
                       help="tokens the draft's output layer predicts over, the most frequent first (FR-Spec); "
                       f"0: all (default {recipe.head_vocab})")
    draft.add_argument("--out", type=Path, help="where to save (default: $PARETORAY_CACHE/drafts/MODEL-L{layers})")
    draft.add_argument("--seed", type=int, default=0)

    head = commands.add_parser("train-acceptance-head", help="train SpecDec++'s acceptance-prediction head for a target/draft pair",
                               description="As SpecDec++'s reference makes its data: the target writes a continuation of each "
                               "prompt; the draft proposes one token at every position of it; the target's acceptance probability of "
                               "each proposal is its label. The head reads the draft's hidden state after each proposal is fed (a "
                               "share of the target's own tokens mixed in) and is trained with the reference's weighted soft "
                               "cross-entropy, saved beside the draft with the temperature and the pair it is for, and its "
                               "calibration on held-out pairs is printed.")
    head.add_argument("--model", default="smollm2-135m", help="the target")
    head.add_argument("--draft", required=True, type=Path, help="the draft's folder (the head is saved there)")
    head.add_argument("--prompts", type=int, default=recipe.head_prompts,
                      help=f"prompts whose target continuations make the data (default {recipe.head_prompts})")
    head.add_argument("--new-tokens", type=int, default=48, help="tokens the target writes per prompt (default 48)")
    head.add_argument("--steps", type=int, default=recipe.head_steps, help=f"training steps (default {recipe.head_steps})")
    head.add_argument("--temperature", type=float, default=0.0,
                      help="the decoding temperature the head is for: 0 = labels for greedy verification; > 0: soft labels "
                      "min(1, p/q) at that temperature (the reference's: 1). Using the head at another temperature warns.")
    head.add_argument("--seed", type=int, default=0)

    moa = commands.add_parser("moa", help="MoA's offline steps: profile a model's heads, search a plan for a density budget",
                              description="The moa technique builds both on first use; these commands make them ahead, "
                              "with other lengths or budgets, and print what they found.")
    moa_commands = moa.add_subparsers(dest="moa_command", required=True, metavar="SUBCOMMAND")
    moa_profile = moa_commands.add_parser("profile", help="gradient-influence profile of every head at several lengths",
                                          description="Long offline documents (the standard library's documentation) with the "
                                          "model's own greedy response; each attention value's influence on the response loss, "
                                          "summed by query-key distance. Saved where the moa technique looks for it unless --out.")
    moa_profile.add_argument("--model", default="smollm2-135m")
    moa_profile.add_argument("--lengths", type=int, nargs="+", default=None, help="tokens (default 1024 2048 on CPU)")
    moa_profile.add_argument("--samples", type=int, default=2, help="calibration documents per length")
    moa_profile.add_argument("--out", type=Path, help="profile file (default: $PARETORAY_CACHE/moa/MODEL-HASH/profile.pt)")
    moa_plan = moa_commands.add_parser("plan", help="one elastic rule per head under a mean-density budget (MILP, HiGHS)")
    moa_plan.add_argument("--model", default="smollm2-135m", help="whose cached profile to use (or give --profile)")
    moa_plan.add_argument("--profile", type=Path, help="a profile file from `paretoray moa profile --out`")
    moa_plan.add_argument("--density", type=float, default=0.5, help="mean share of the KV cache kept (default 0.5, the reference's)")
    moa_plan.add_argument("--lengths", type=int, nargs="+", default=None,
                          help="prompt lengths (tokens) the plan serves: mean density within [0.9 D, D] at each (default: the profiled lengths)")
    moa_plan.add_argument("--extend", type=int, default=None,
                          help="a longer length also held to <= D (default: twice the longest of --lengths, as the reference's 16K beside 8K)")
    moa_plan.add_argument("--rules-per-layer", type=int, default=2, help="distinct rules allowed per layer (reference: 2)")
    moa_plan.add_argument("--out", type=Path, help="plan JSON (default: where the moa technique looks for it)")

    ui = commands.add_parser("ui", help="start the MLflow UI on the project's tracking store and print its URL "
                             "(for an http:// tracking URI, print that server's URL)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--workers", type=int, default=1, help="server processes (default 1, enough for one person; mlflow's own default is 4)")
    _add_store_options(ui)
    return parser


def _fail(message: str, code: int = 2) -> int:
    from paretoray.orchestrator.stores import redact

    print(f"error: {redact(message)}", file=sys.stderr)  # a store's error may quote its URL
    return code


def _sweep(args: argparse.Namespace) -> int:
    if args.sweep_command == "validate":  # the spec alone: neither Ray, Optuna nor MLflow is loaded
        from paretoray.orchestrator.spec import SpecError, load_spec, notes

        try:
            spec = load_spec(args.spec)
        except SpecError as error:
            return _fail(str(error))
        print(f"{args.spec}: valid sweep {spec.name!r}: {len(spec.techniques)} technique(s), {spec.trials} trials")
        for note in notes(spec):
            print(f"note: {note}")
        return 0
    from paretoray.orchestrator.controller import Controller, SweepError, check_stores, sweep_state
    from paretoray.orchestrator.spec import SpecError, check_name, check_trials, load_spec, read_spec_text
    from paretoray.orchestrator.stores import StoreError, redact, resolve_stores

    try:
        check_trials(args.trials)  # as the spec's `trials`: 1 to spec.MAX_TRIALS
        if args.sweep_command == "run":
            spec = load_spec(args.spec)  # before anything is created: a bad file leaves no trace
            from paretoray.orchestrator.spec import notes

            for note in notes(spec):
                print(f"note: {note}", file=sys.stderr)
            if args.name:  # checked as the spec's `name` (it names folders: no `..`, no `/`)
                spec = spec.model_copy(update={"name": check_name(args.name)})
            stores = resolve_stores(args.tracking_uri, args.storage)
            check_stores(stores)  # both answer, before anything else is read or started
            # A half-created sweep (its controller died while creating it) ran no trial: `run` makes it again.
            resume = args.resume_if_exists and sweep_state(stores.optuna_storage(), spec.name) == "created"
            if resume:
                print(f"sweep {spec.name!r} exists: resuming it", file=sys.stderr)
                controller = Controller.for_resume(spec.name, stores, report=_live_report)
            else:
                controller = Controller(spec, stores, spec_text=read_spec_text(args.spec), report=_live_report)
            result = controller.run(resume=resume, trials=args.trials, ray_address=args.ray_address, progress=not args.no_progress)
        else:
            check_name(args.name, "NAME")
            stores = resolve_stores(args.tracking_uri, args.storage)
            check_stores(stores)
            controller = Controller.for_resume(args.name, stores, report=_live_report)
            result = controller.run(resume=True, trials=args.trials, ray_address=args.ray_address, progress=not args.no_progress)
    except (SpecError, StoreError) as error:
        return _fail(str(error))
    except SweepError as error:
        return _fail(str(error), 1)
    except KeyboardInterrupt:
        name = getattr(args, "name", None) or "NAME"
        return _fail(f"interrupted; finished trials are recorded. Continue with: paretoray sweep resume {name}", 130)
    from paretoray.orchestrator import pareto

    print(f"\nsweep {result.name}: {result.trials_finished} trials finished ({result.trials_failed} failed) "
          f"in {result.wall_s:.0f} s")
    objectives = list(controller.spec.objectives)
    print(_table(pareto.front_frame(result.rows, objectives, pareto_only=True), objectives))
    print(f"\nMLflow parent run {result.parent_run_id} ({redact(stores.tracking_uri)})")
    print(f"browse it:  paretoray ui{_store_flags(args)}")
    return 0


def _live_report(*args):
    """The sweep's live report page, drawn by the dashboards (imported when first drawn: plotly is slow to load)."""
    from paretoray.dashboards import live_report_html

    return live_report_html(*args)


def _delete(args: argparse.Namespace) -> int:
    from paretoray.orchestrator.book import delete_sweep, study_exists
    from paretoray.orchestrator.controller import SweepError, check_stores
    from paretoray.orchestrator.lease import LeaseHeld
    from paretoray.orchestrator.stores import redact, resolve_stores

    stores = resolve_stores(args.tracking_uri, args.storage)
    try:
        check_stores(stores)
        if not study_exists(stores.optuna_storage(), args.name):
            stores.load_study(args.name)  # raises the StoreError that lists the sweeps there
        lease = stores.lease(args.name)  # not while a controller runs it
    except LeaseHeld as held:
        return _fail(str(held), 1)
    except SweepError as error:
        return _fail(str(error), 1)
    try:
        if not args.yes:
            if not sys.stdin.isatty():
                return _fail(f"deleting sweep {args.name!r} needs confirmation: run it in a terminal, or add --yes")
            answer = input(f"delete sweep {args.name!r} (its Optuna study in {redact(stores.storage)} and its MLflow "
                           f"experiment in {redact(stores.tracking_uri)})? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        removed = delete_sweep(stores, args.name)
    finally:
        lease.release()
    print(f"sweep {args.name!r} deleted: {removed}")
    return 0


def _store_flags(args: argparse.Namespace) -> str:
    from paretoray.orchestrator.stores import redact

    uri = getattr(args, "tracking_uri", None)
    if not uri:
        return ""
    if redact(uri) != uri:  # never echo a password; the environment carries it without showing it
        return f" --tracking-uri {redact(uri)}  (better: export PARETORAY_TRACKING_URI=<the URI> and omit the flag)"
    return f" --tracking-uri {uri}"


def _table(frame, objectives: list[str]) -> str:
    import polars as pl

    shown = frame.select(["trial", "label", *objectives, "pareto"])
    with pl.Config(tbl_rows=200, tbl_cols=20, fmt_str_lengths=80, tbl_width_chars=240, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True, float_precision=4):
        return str(shown)


def _results(args: argparse.Namespace) -> int:
    from paretoray.names import OBJECTIVES_ATTR
    from paretoray.orchestrator import pareto
    from paretoray.orchestrator.stores import resolve_stores

    study = resolve_stores(args.tracking_uri, args.storage).load_study(args.name)
    objectives = study.user_attrs.get(OBJECTIVES_ATTR) or [f"objective_{i}" for i in range(len(study.directions))]
    rows = pareto.trial_rows(study, objectives)
    if args.pareto:
        rows = [r for r in rows if r["pareto"]]
    if args.format == "json":
        keys = ("trial", "technique", "params", "metrics", "pareto", "mlflow_run_id")
        print(json.dumps([{k: r[k] for k in keys} | {"state": r["state"]} for r in rows], indent=2, default=str))
    elif args.format == "csv":
        print(pareto.front_frame(rows, objectives).write_csv(), end="")
    else:
        print(_table(pareto.front_frame(rows, objectives), objectives))
    return 0


def _report(args: argparse.Namespace) -> int:
    from paretoray.dashboards import ReportError, write_report
    from paretoray.dashboards.report import default_mlflow_url
    from paretoray.orchestrator.stores import resolve_stores, strip_credentials

    stores = resolve_stores(args.tracking_uri, args.storage)
    url = strip_credentials(args.mlflow_url) if args.mlflow_url else default_mlflow_url(stores.tracking_uri)
    command = "paretoray report " + " ".join(args.names) + (" --force" if args.force else "")
    try:
        out = write_report(args.names, stores, args.output, force=args.force, mlflow_url=url, command=command)
    except ReportError as error:
        return _fail(str(error))
    print(f"report written to {out} ({out.stat().st_size / 2**20:.1f} MiB, opens offline); run links open {url}")
    return 0


def _techniques() -> int:
    from paretoray.actors.declarations import CompositionError, composition_declaration, technique_declarations  # cached: no torch

    for name, declared in technique_declarations().items():
        uses_model = declared.capabilities.get("uses_model", True)
        decoding = ", compiled decoding" if declared.capabilities.get("static_decode") else (", eager decoding" if uses_model else "")
        batches = ", batches" if declared.capabilities.get("batched") else (", one sequence at a time" if uses_model else "")
        print(f"{name}  ({declared.phase}{decoding}{batches})  {declared.summary}")
        for key, param in declared.params.items():
            print(f"    {key:<20} {param.describe():<36} default {param.default!r}  {param.doc}")
    declared = technique_declarations()
    takers = {name: d for name, d in declared.items() if d.capabilities.get("accepts")}
    if takers:
        print("\ncompositions (a sweep's `techniques:` key outer+inner, each member's parameters under its name):")
        for name, d in takers.items():
            fits = []
            for inner in declared:
                try:
                    composition_declaration(f"{name}+{inner}", declared)
                    fits.append(inner)
                except CompositionError:
                    pass
            print(f"    {name}+INNER   INNER one of: {', '.join(fits) or 'none'}")
    return 0


def _tasks() -> int:
    from paretoray.actors.tasks import available_tasks
    from paretoray.actors.tasks.base import describe_config
    from paretoray.actors.workload import Workload

    def fields(rows) -> None:
        for key, kind, default, doc in rows:
            print(f"    {key:<20} {kind:<36} default {default}  {doc}")

    print("every task (workload section):")
    fields([row for row in describe_config(Workload) if row[0] != "task"])
    for name, cls in available_tasks().items():
        budget = f"{cls.default_max_new_tokens} new tokens by default"
        print(f"\n{name}  ({budget})  {cls.summary}")
        fields(describe_config(cls.Config))
    return 0


def _train_draft(args: argparse.Namespace) -> int:
    import dataclasses

    from paretoray.actors.models import ModelLoadError, cache_root, load_model
    from paretoray.recipes.draft import train_draft

    out = args.out or cache_root() / "drafts" / f"{Path(args.model).name}-L{args.layers}"
    try:
        target, tokenizer = load_model(args.model, dtype="float32")
    except ModelLoadError as error:
        return _fail(str(error), 1)
    report = train_draft(target, tokenizer, out, layers=args.layers, steps=args.steps, prompts=args.prompts,
                         passages=args.passages, new_tokens=args.new_tokens, head_vocab=args.head_vocab, seed=args.seed)
    print(json.dumps(dataclasses.asdict(report), indent=1))
    print(f"draft saved in {out}; use it with  model: {{id: {args.model}, draft: {out}}}")
    return 0


def _train_head(args: argparse.Namespace) -> int:
    import dataclasses

    from paretoray.actors.models import ModelLoadError, load_model
    from paretoray.recipes.acceptance_head import train_acceptance_head

    try:
        target, tokenizer = load_model(args.model, dtype="float32")
        draft, _ = load_model(str(args.draft), dtype="float32")
    except ModelLoadError as error:
        return _fail(str(error), 1)
    report = train_acceptance_head(target, draft, tokenizer, args.draft, prompts=args.prompts,
                                   new_tokens=args.new_tokens, steps=args.steps, temperature=args.temperature, seed=args.seed)
    print(json.dumps(dataclasses.asdict(report), indent=1))
    print(f"head saved in {args.draft}; sweep it with technique specdec_pp and model: {{id: {args.model}, draft: {args.draft}}}")
    return 0


def _moa(args: argparse.Namespace) -> int:
    from paretoray.actors.models import ModelLoadError, load_model, resolve
    from paretoray.recipes.moa import DEFAULT_LENGTHS, Profile, moa_folder, plan_file, profile_model, search_plan

    def default_folder() -> Path:
        return moa_folder(resolve(args.model))

    try:
        if args.moa_command == "profile":
            model, tokenizer = load_model(args.model, dtype="float32")
            profile = profile_model(model, tokenizer, args.lengths or DEFAULT_LENGTHS, samples_per_length=args.samples)
            out = args.out or default_folder() / "profile.pt"
            profile.save(out)
            print(f"profile of {args.model} at {profile.lengths} tokens ({profile.seconds:.0f} s) saved in {out}")
            return 0
        source = args.profile or default_folder() / "profile.pt"
        if not source.exists():
            return _fail(f"no profile at {source}: run `paretoray moa profile --model {args.model}` first", 1)
        profile = Profile.load(source)
        plan = search_plan(profile, args.density, lengths=args.lengths, extend_length=args.extend,
                           rules_per_layer=args.rules_per_layer)
    except ModelLoadError as error:
        return _fail(str(error), 1)
    except ValueError as error:
        return _fail(str(error), 1)
    out = args.out or plan_file(source.parent, args.density, plan.lengths, plan.extend_length)
    plan.save(out)
    spans = {n: [[rule.span(int(n)) for rule in plan.rules(layer)] for layer in range(len(plan.alphas))] for n in plan.achieved_density}
    for n, density in plan.achieved_density.items():
        flat = [s for row in spans[n] for s in row]
        loss = f", predicted loss increase {plan.predicted_loss[n]:.4g}" if n in plan.predicted_loss else ""
        role = "served" if int(n) in plan.lengths else "extension"
        print(f"at {n} tokens ({role}): mean density {density:.3f}, spans {min(flat)}-{max(flat)} tokens "
              f"(mean {sum(flat) / len(flat):.0f}){loss}")
    print(f"plan saved in {out}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from paretoray.orchestrator.stores import redact, resolve_stores, strip_credentials

    stores = resolve_stores(args.tracking_uri, args.storage)
    if stores.tracking_uri.startswith(("http://", "https://")):
        # A tracking server (a cluster's head) is already the UI: starting another would only proxy it.
        print(f"MLflow UI: {strip_credentials(stores.tracking_uri)}  (the tracking server itself; nothing to start)")
        where = urlsplit(stores.tracking_uri)
        host = where.hostname or "localhost"
        if host not in ("127.0.0.1", "localhost"):
            try:
                port = str(where.port or 5000)
            except ValueError:
                port = "5000"
            print(f"if its port is closed to you, forward it:  ssh -L {port}:localhost:{port} {host}  "
                  f"(or `ray attach cluster.yaml -p {port}`), then open http://127.0.0.1:{port}")
        return 0
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {redact(stores.tracking_uri)}\n  open {url}  (Ctrl-C stops it)\n"
          f"  sweeps and their trial runs: {url}/#/experiments?workflowType=machine_learning (MLflow's 'Model training' view)",
          flush=True)
    command, env = ui_command(mlflow, stores.tracking_uri, args.host, args.port, args.workers)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


def ui_command(mlflow: str, tracking_uri: str, host: str, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command line and environment for `paretoray ui`. The store's URI (which
    may hold a password) goes in the environment (`mlflow server` reads MLFLOW_BACKEND_STORE_URI),
    never on the command line, which every user of the machine can read (`ps`)."""
    command = [mlflow, "server", "--host", host, "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": tracking_uri,
           # MLflow's job runner (five more processes) serves its GenAI features; browsing sweeps needs none of it.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    return command, env


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from paretoray.orchestrator.stores import StoreError

    try:
        return _dispatch(args)
    except StoreError as error:  # a store URL this machine cannot use (a driver missing, ...), for every command
        return _fail(str(error))
    except Exception:  # a store or driver error that may quote a URL with its password: the traceback, redacted
        import traceback

        from paretoray.orchestrator.stores import redact

        print(redact(traceback.format_exc()), end="", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "sweep" and args.sweep_command == "delete":
        return _delete(args)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "results":
        return _results(args)
    if args.command == "report":
        return _report(args)
    if args.command == "techniques":
        return _techniques()
    if args.command == "tasks":
        return _tasks()
    if args.command == "train-draft":
        return _train_draft(args)
    if args.command == "train-acceptance-head":
        return _train_head(args)
    if args.command == "moa":
        return _moa(args)
    return _ui(args)


if __name__ == "__main__":
    sys.exit(main())

"""`slmops run --config F` and `slmops search --config F`: a workflow file in Olive's shape."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

from slmops.cli import add_log_level


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    for command, text in (("run", "run a workflow (model, data, passes) from a YAML or JSON file, Olive's shape"),
                          ("search", "run a workflow's hyperparameter search (search_strategy, search_space); "
                                     "start it on several machines to share one study")):
        p = sub.add_parser(command, help=text, description=text + ". Passes already done with the same inputs "
                                                                   "are reused; see docs/workflows.md.")
        p.add_argument("--config", "--run-config", required=True, help="workflow file (.yaml, .yml or .json)")
        p.add_argument("--output_dir", help="run folder (default: the file's output_dir, else runs/CONFIG_NAME)")
        p.add_argument("--dry_run", action="store_true", help="print the resolved plan (which passes would run "
                                                              "and which are reused) without running")
        p.add_argument("--setup", action="store_true", help="first pip-install the packages the passes need")
        p.add_argument("--list_required_packages", action="store_true",
                       help="print the packages the passes need (and which are missing), then stop")
        if command == "search":
            p.add_argument("--storage", help="the study's database, overriding search_strategy.storage: "
                                             "postgresql://USER:PASSWORD@HOST:5432/DATABASE shares it across machines")
            p.add_argument("--status", action="store_true", help="print the study's trials, their states and the best "
                                                                 "so far, from its database; runs nothing")
        add_log_level(p)
    return {"run": handle, "search": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.errors import UsageError
    from slmops.workflow.reading import load_workflow

    wf = load_workflow(args.config, args.output_dir)
    searching = args.command == "search"
    if searching and wf.search is None:
        raise UsageError(f"{args.config} has no search_strategy; add search_strategy and search_space, or use "
                         f"`slmops run`")
    if searching and args.storage:
        wf.search = wf.search.model_copy(update={"storage": args.storage})
    if searching and args.status:
        return _status(wf)
    needed = required_packages(wf)
    if args.list_required_packages:
        for module, requirement in needed:
            print(f"{requirement:<28} {'installed' if _installed(module) else 'missing'}")
        return 0
    missing = [req for module, req in needed if not _installed(module)]
    if args.setup and missing:
        print(f"installing {' '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", *missing], check=True)
    elif missing:
        raise UsageError(f"the passes need {', '.join(missing)}, not installed; add --setup to install them")
    from slmops.workflow.engine import plan, run_workflow

    if args.dry_run:
        print(_plan_table(wf, plan(wf)))
        return 0
    from slmops.errors import Interrupted

    if wf.search is not None and wf.search.storage:  # a wrong URL is said before any pass runs
        from slmops.workflow.study import check_storage

        check_storage(wf.search.storage)
    try:
        model = run_workflow(wf, search_only=searching)
    except Interrupted as err:
        print(f"slmops {args.command}: interrupted: checkpoint saved in {err.checkpoint}; run the same command "
              f"again to continue (a fine-tuning pass resumes from its checkpoint, a search keeps its finished "
              f"trials)", file=sys.stderr)
        return 130
    if wf.search is not None:
        from slmops.workflow.search import summary

        print(summary(wf.passes[wf.searched_pass()].folder))
    print(f"output model: {model.describe()}")
    return 0


def _status(wf) -> int:
    from slmops.workflow.engine import plan
    from slmops.workflow.passes import ModelRef, Step
    from slmops.workflow.search import status

    name = wf.searched_pass()
    entry = next(e for e in plan(wf) if e["name"] == name)
    p = wf.passes[name]
    print(status(Step(name, p.type, p.options, ModelRef(""), p.folder, p.owned, entry["key"]), wf))
    return 0


def required_packages(wf) -> list[tuple[str, str]]:
    from slmops.workflow.passes import POSTGRES_NEEDS, SEARCH_NEEDS, pass_types

    needs = [need for p in wf.passes.values() for need in pass_types()[p.type].needs]
    if wf.search is not None:
        needs += SEARCH_NEEDS + (POSTGRES_NEEDS if (wf.search.storage or "").startswith("postgresql") else ())
    return list(dict.fromkeys(needs))


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _plan_table(wf, steps: list[dict]) -> str:
    from slmops.options.fields import fields_in

    lines = [f"workflow {wf.source}: model {wf.model.describe()}; run folder {wf.output_dir}"]
    if wf.search is not None:
        s = wf.search
        lines.append(f"search: {s.type}, {s.num_trials} trials, {s.goal} {s.metric}, over {', '.join(wf.space)}")
    for i, step in enumerate(steps, 1):
        status = "reuse (unchanged)" if step["done"] else "run"
        lines.append(f"  {i}. {step['name']:<16} {step['type']:<20} {status:<18} -> {step['folder']}")
        options = wf.passes[step["name"]].options
        shown = set(fields_in(type(options), "model", "data")) | {"output_path"}  # the model, data and folder: above
        settings = options.model_dump(exclude_defaults=True, exclude_none=True, exclude=shown)
        if settings:
            lines.append(f"     {settings}")
    return "\n".join(lines)

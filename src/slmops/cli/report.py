"""`slmops report`: draw a run's report.html again (finetune writes one itself), e.g. for an older run."""

from __future__ import annotations

import argparse

from slmops.cli import add_log_level


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("report", help="write a run's report.html (curves, warnings, before/after, data, settings)",
                       description="Write one self-contained HTML page for a `slmops finetune` output folder: loss, "
                                   "learning-rate, throughput and memory curves, warnings (overfitting, divergence, "
                                   "truncation, forgetting, data checks), metrics before -> after, data, "
                                   "configuration and environment.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `slmops finetune` output folder (with manifest.json)")
    p.add_argument("--output", help="where to write the page (default: RUN_DIR/report.html)")
    add_log_level(p)
    return {"report": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.artifacts.report import write_report

    print(write_report(args.run_dir, args.output))
    return 0

"""``qpruner <verb>``: the command line. The only place that configures logging.

    qpruner search   JOB.yaml [key=value ...]   prune once, search mixed precision, write results
    qpruner prune    JOB.yaml [key=value ...]   only prune, save to results/<job>/pruned/ (reused by search)
    qpruner status   RESULTS_DIR               the front and trial counts of a search (also while it runs)
    qpruner report   RESULTS_DIR               report.html (front, bits heat-map, hypervolume, trial table)
    qpruner export   RESULTS_DIR --point K     a front point as a loadable model (safetensors + adapter)
    qpruner validate JOB.yaml [key=value ...]   check a job file (and overrides) without running it
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import load_job, to_dict
from .errors import QPrunerError


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("qpruner").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_validate(args) -> int:
    job = load_job(args.job, args.overrides)
    sections = ", ".join(k for k, v in to_dict(job).items() if isinstance(v, dict))
    print(f"OK: {args.job} is a valid job '{job.name}' ({sections}); results -> {job.results_path}")
    return 0


def _cmd_status(args) -> int:
    from pathlib import Path

    import yaml

    from .config import build_job
    from .job import front_metric
    from .pareto import TRIALS_FILE, TrialLog
    from .report import front_table

    directory = Path(args.results)
    if not (directory / TRIALS_FILE).is_file():
        print(f"error: {directory} has no {TRIALS_FILE} yet (is it a results/<job>/ directory?)", file=sys.stderr)
        return 2
    job = build_job(yaml.safe_load((directory / "job.yaml").read_text())) if (directory / "job.yaml").is_file() else None
    metric = front_metric(job) if job else "accuracy"
    log = TrialLog(directory, metric)
    summary = log.summary()
    counts = ", ".join(f"{v} {k[2:]}" for k, v in summary.items() if k.startswith("n_"))
    print(f"{directory}: {summary['trials']} trials ({counts}); front {summary['front_size']} plans, "
          f"hypervolume {summary['hypervolume']:.4g}")
    print(front_table(log.front(), metric))
    return 0


def _cmd_report(args) -> int:
    from pathlib import Path

    from .report import write_report

    directory = Path(args.results)
    if not (directory / "trials.parquet").is_file():
        print(f"error: {directory} has no trials.parquet (is it a results/<job>/ directory?)", file=sys.stderr)
        return 2
    print(f"wrote {write_report(directory)} (and pareto.png, bits.png, hypervolume.png)")
    return 0


def _cmd_export(args) -> int:
    from .export import export_point, lm_eval

    out = export_point(args.results, args.point, args.out)
    print(f"exported front point {args.point} to {out}/ (load it with qpruner.load)")
    if args.lm_eval:
        summary = lm_eval(out, [t for t in args.lm_eval.split(",") if t], args.lm_eval_limit)
        print(f"lm-evaluation-harness: {summary}")
    return 0


def _cmd_prune(args) -> int:
    from .job import load_or_prune, resolve_device

    job = load_job(args.job, args.overrides)
    pruned = load_or_prune(job, resolve_device(job.device), force=args.force)
    print(("reused: " if pruned.reused else "") + pruned.report.summary())
    print(f"pruned model: {job.results_path / 'pruned'}/ (load it with `import qpruner` and "
          "transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_search(args) -> int:
    from .job import front_metric, run_job
    from .report import front_table

    job = load_job(args.job, args.overrides)
    outcome = run_job(job, resume=args.resume)
    trials = outcome.trials
    counts = trials["status"].value_counts().to_dict() if not trials.empty else {}
    print()
    print(f"QPruner job '{job.name}' finished in {outcome.seconds:.0f}s")
    print(outcome.prepared.prune.summary())
    print(f"trials: {len(trials)} ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    print(f"Pareto front ({len(outcome.front)} plans):")
    print(front_table(outcome.front, front_metric(job)))
    print(f"results: {outcome.directory}/ (report.html, trials.parquet, pareto.parquet, pareto.png, job.yaml, pruned/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpruner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qpruner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (("search", _cmd_search, "prune once and search mixed precision"),
                              ("prune", _cmd_prune, "only prune; save the pruned model for later searches"),
                              ("validate", _cmd_validate, "validate a job file without running it")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job", help="job file (YAML), e.g. tune_jobs/smollm2_demo.yaml")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override a job key, e.g. finetune.steps=5")
        if name == "prune":
            p.add_argument("--force", action="store_true", help="prune again even if a matching pruned model exists")
        if name == "search":
            p.add_argument("--resume", action="store_true", help="continue an interrupted search of this job")
        p.set_defaults(func=func)
    p = sub.add_parser("export", help="export a front point as a loadable model directory")
    p.add_argument("results", help="a results/<job>/ directory")
    p.add_argument("--point", type=int, default=0, help="front point, 0 = the smallest model (default)")
    p.add_argument("--out", default=None, help="output directory (default results/<job>/exports/point<K>-<trial>)")
    p.add_argument("--lm-eval", default="", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks: harness names (their datasets "
                   "download) or task YAML files (custom tasks, e.g. over local JSON: offline)")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="items per lm-eval task")
    p.set_defaults(func=_cmd_export)
    for name, func, help_ in (("status", _cmd_status, "print the front of a (running) search"),
                              ("report", _cmd_report, "write report.html and the plots of a search")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("results", help="a results/<job>/ directory")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.func(args)
    except QPrunerError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``qpruner <verb>``: the command line. The only place that configures logging.

    qpruner search   JOB.yaml [key=value ...]   prune once, search mixed precision, write results
    qpruner prune    JOB.yaml [key=value ...]   only prune, save to results/<job>/pruned/ (reused by search)
    qpruner status   DIR|JOB.yaml|SUBMISSION_ID  progress and front of a search (also while it runs; a
                                               submission id through the Ray job API, no files needed)
    qpruner report   RESULTS_DIR               report.html (front, bits heat-map, hypervolume, trial table)
    qpruner export   RESULTS_DIR --point K     a front point (or --trial t0007) as a loadable model
    qpruner validate JOB.yaml [key=value ...]   check a job file (and overrides) without running it
    qpruner dashboard [--out FILE]              the Grafana dashboard of the qpruner Ray metrics
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from . import __version__
from .config import load_job, to_dict
from .errors import ConfigError, QPrunerError, ResultsError, SearchIncomplete
from .rundir import front_metric


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("qpruner").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_validate(args) -> int:
    from .config import lowest_avg_bits
    job = load_job(args.job, args.overrides)
    sections = ", ".join(k for k, v in to_dict(job).items() if isinstance(v, dict))
    print(f"OK: {args.job} is a valid job '{job.name}' ({sections}); results -> {job.results_path}")
    if job.policy.budget_avg_bits is not None:
        lows = ", ".join(f"{b}-bit >= {lowest_avg_bits(b, job.quant):.3f}" for b in sorted(job.policy.bits))
        print(f"budget: <= {job.policy.budget_avg_bits:g} average bits (uniform plans need {lows} average bits; "
              "the exact sizes, and which uniform plans the budget admits, are printed after pruning)")
    from .config import is_hub_dataset
    online = [what for what, needed in (
        (f"data.source {job.data.source!r} is a Hugging Face Hub dataset", is_hub_dataset(job.data.source)),
        (f"model.source {job.model.source!r} is a Hub model id", _is_hub_model(job.model.source))) if needed]
    for what in online:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE",
                                                                                         "0") not in ("", "0")
        print(f"note: {what}: reading it needs the network (or a local cache of it)"
              + ("; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set here, so only a cached copy will do" if offline
                 else ""), file=sys.stderr)
    if job.model.trust_remote_code:
        print(f"warning: model.trust_remote_code is on: {job.model.source} may run its own code here", file=sys.stderr)
    if job.device == "cuda":
        from .config import preflight
        for problem in preflight(job):
            print(f"note: {problem} (valid as a job for another machine)", file=sys.stderr)
    return 0


def _is_hub_model(source: str) -> bool:
    """A ``model.source`` that is neither built in nor a local directory: a Hub id, fetched over the network."""
    return (source != "tiny" and not source.startswith("builtin:") and not Path(source).expanduser().exists()
            and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None)


def _run_dir(path: str):
    from .rundir import RunDir
    run = RunDir(path)
    if not run.path.is_dir():
        raise ResultsError(f"{run.path} is not a directory (expected a results/<job>/ directory)")
    return run


PROGRESS = re.compile(r"(\d\d:\d\d:\d\d) INFO qpruner\.search\.callbacks: progress: (\d+)/(\S+) trained, (\d+) rows, "
                      r"front (\d+) plans, hypervolume (\S+)")


TRIAL_LINE = re.compile(r"(\d\d:\d\d:\d\d) (?:INFO|WARNING) qpruner\.search\.callbacks: trial (\S+?): (.*)$")


def _seconds(stamp: str) -> int:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + int(s)


def running_from_logs(logs: str) -> list[dict]:
    """The trials a search's log shows running: started (or reporting progress) and not ended since, each with
    its start, last step/steps/loss/ETA from its progress lines (``trial t0007-…: step 12/40, loss 2.31, ...``)."""
    running: dict[str, dict] = {}
    last = None
    for line in logs.splitlines():
        m = TRIAL_LINE.search(line)
        if not m:
            continue
        stamp, name, rest = m.groups()
        last = stamp
        if rest.startswith("started"):
            running[name] = {"trial": name, "started_at": stamp}
        elif rest.startswith("step "):
            entry = running.setdefault(name, {"trial": name, "started_at": stamp})
            step = re.match(r"step (\d+)/(\d+), loss (\S+?)(?:,|$)", rest)
            eta = re.search(r"ETA ([\d.]+) min", rest)
            if step:
                entry.update(step=int(step.group(1)), steps=int(step.group(2)), train_loss=step.group(3))
            entry["eta_s"] = float(eta.group(1)) * 60 if eta else None
            entry["updated_at"] = stamp
        else:   # its result, an error, an early stop: ended
            running.pop(name, None)
    for entry in running.values():
        entry["elapsed_s"] = (_seconds(last) - _seconds(entry["started_at"])) % 86400 if last else None
    return list(running.values())


def format_running(trials: list[dict]) -> str:
    """``running: t0007-44448888  4.2 min  step 12/40  loss 2.314  ETA 3.1 min`` lines, one per trial."""
    lines = []
    for t in trials:
        elapsed = t.get("elapsed_s")
        if elapsed is None and t.get("started"):
            elapsed = time.time() - float(t["started"])
        loss = t.get("train_loss")
        parts = [f"running: {t.get('trial')}", f"{elapsed / 60:.1f} min" if elapsed is not None else "",
                 f"step {t['step']}/{t.get('steps', '?')}" if t.get("step") is not None else "not training yet",
                 f"loss {float(loss):.4g}" if loss not in (None, "nan") else "",
                 f"ETA {t['eta_s'] / 60:.1f} min" if t.get("eta_s") is not None else ""]
        lines.append("  ".join(p for p in parts if p))
    return "\n".join(lines)


def _status_of_submission(submission: str, address: str | None, also_path: bool = False) -> int:
    """A search submitted with `ray job submit`, through the Ray job API (no access to the head's files)."""
    from .errors import BackendError
    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    try:
        from ray.job_submission import JobSubmissionClient
        client = JobSubmissionClient(address)
        status = str(client.get_job_status(submission))
        logs = client.get_job_logs(submission)
    except Exception as exc:  # noqa: BLE001 - the transport's errors vary (HTTP, auth, unknown id)
        raise BackendError(f"cannot read job {submission!r} from the Ray job API at {address}: "
                           f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}. "
                           "Pass --address http://HEAD:8265 (or set RAY_ADDRESS); with token authentication set "
                           "RAY_AUTH_MODE=token and the head's token (RAY_AUTH_TOKEN_PATH)"
                           + (f". Nor is there a results directory {submission!r} or results/{submission} here "
                              "(`qpruner status results/<job>`)" if also_path else "")) from None
    status = status.rsplit(".", 1)[-1]
    progress = PROGRESS.findall(logs)
    if not progress:
        print(f"{submission}: {status}" + (", 0 trials finished" if status in ("RUNNING", "PENDING") else ""))
        if status == "RUNNING" and (running := running_from_logs(logs)):
            print(format_running(running))
        return 0
    stamp, done, wanted, _, front, hv = progress[-1]
    line = f"{submission}: {status}, {done} of {wanted} trials finished; front {front} plans, hypervolume {hv}"
    if status == "RUNNING" and wanted.isdigit() and int(done) < int(wanted):
        seconds = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in (p[0].split(":") for p in progress)]
        trained = [int(p[1]) for p in progress]
        if trained[-1] > trained[0]:
            pace = ((seconds[-1] - seconds[0]) % 86400) / (trained[-1] - trained[0])
            line += f"; about {pace * (int(wanted) - int(done)) / 60:.0f} min left at the current pace"
    print(line)
    ended = [l for l in logs.splitlines() if "qpruner.search.callbacks: trial " in l
             and not (TRIAL_LINE.search(l) and TRIAL_LINE.search(l).group(3).startswith(("step ", "started")))]
    print("\n".join(ended)[-3000:])
    if status == "RUNNING" and (running := running_from_logs(logs)):
        print(format_running(running))
    return 0


def _cmd_status(args) -> int:
    from .pareto import TrialLog
    from .report import front_table

    target = Path(args.results)
    if not args.address and not target.exists() and (Path("results") / target).is_dir():
        target = Path("results") / target   # `qpruner status smollm2_demo`: the job's results directory
        args.results = str(target)
    if args.address or (not target.exists() and re.fullmatch(r"[\w-]+", args.results)):
        return _status_of_submission(args.results, args.address, also_path=not args.address)
    if target.is_file() and target.suffix in (".yaml", ".yml"):
        args.results = str(load_job(target).results_path)
    run = _run_dir(args.results)
    if not run.is_ours():
        raise ResultsError(f"{run.path} is not a results/<job>/ directory of qpruner (no job.yaml, no marker)")
    job = run.read_job() if run.job_file.is_file() else None
    metric = front_metric(job) if job else "accuracy"
    holder = run.holder()
    print(f"{run.path}: " + (f"running: {holder}" if holder else "not running (no search holds it)"))
    if running := run.running():
        print(format_running(running))
    if not run.has_trials():
        print(f"{run.path}: no trial finished yet" + (f" (job '{job.name}', {job.search.num_trials} trials wanted)"
                                                        if job else ""))
        return 0
    log = TrialLog(run.path, metric)
    ref = run.reference()   # the search's fixed reference: the same hypervolume as its log and metrics
    summary = log.summary(ref)
    counts = ", ".join(f"{v} {k[2:]}" for k, v in summary.items() if k.startswith("n_"))
    print(f"{run.path}: {summary['trials']} trials ({counts}); front {summary['front_size']} plans, "
          f"hypervolume {summary['hypervolume']:.4g}" + ("" if ref else " (against the worst trial so far)"))
    print(front_table(log.front(), metric))
    return 0


def _cmd_report(args) -> int:
    from .report import write_report

    from .rundir import MARKER
    run = _run_dir(args.results)
    if not run.is_ours():   # never write into (or over a report.html of) a directory qpruner did not write
        raise ResultsError(f"{run.path} was not written by qpruner (no {MARKER}, no valid job.yaml); nothing was "
                           "written. Give the results/<job>/ directory of a search")
    run.trials()  # a clear error when missing or unreadable
    print(f"wrote {write_report(run.path)} (and pareto.png, bits.png, hypervolume.png)")
    return 0


def _cmd_export(args) -> int:
    from .export import export_point, lm_eval

    formats = list(dict.fromkeys(args.format or ()))
    if args.gguf_4bit is not None and "gguf" not in formats:
        raise ConfigError(["--gguf-4bit is the GGUF type of the 4-bit layers: it needs --format gguf"])
    if "gguf" in formats:
        from .gguf_export import preflight
        preflight(args.results)          # an unsupported model fails before the export's work, not after
    out = export_point(args.results, args.point, args.out, trial=args.trial, retrain=args.retrain)
    print(f"exported {('trial ' + args.trial) if args.trial else f'front point {args.point}'} to {out}/ "
          "(load it with qpruner.load)")
    if args.merge:
        from .export import merge_export
        merged, nll, trial_nll = merge_export(out, args.merge)
        how = ("`import qpruner` and transformers.AutoModelForCausalLM.from_pretrained" if args.merge == "bf16"
               else "qpruner.load")
        print(f"merged (LoRA into the weights, {'bf16' if args.merge == 'bf16' else 'quantized to the plan'}): "
              f"{merged}/; held-out NLL {nll:.6f}, the trial's {trial_nll:.6f} (load it with {how})")
    for fmt in formats:
        from .gguf_export import export_gguf
        path, entry = export_gguf(out, args.gguf_4bit or "q4_0", results=args.results, source=args.gguf_source)
        trial_nll = entry["trial_nll"]
        print(f"{fmt}: {path} ({entry['architecture']} architecture, {entry['bytes'] / 1e6:.1f} MB, tensor types "
              f"{entry['tensor_types']}); held-out NLL of the file's weights {entry['nll']:.6f}, the trial's "
              + (f"{trial_nll:.6f}" if trial_nll is not None else "unknown")
              + (f"; {len(entry['fallbacks'])} linears kept in BF16 (width not a multiple of 32)"
                 if entry["fallbacks"] else ""))
    if args.lm_eval:
        summary = lm_eval(out, [t for t in args.lm_eval.split(",") if t], args.lm_eval_limit)
        print(f"lm-evaluation-harness: {summary}")
    if args.push_to_hub:
        from .export import push_to_hub
        print(f"pushed to the Hub: {push_to_hub(out, args.push_to_hub, args.private)}")
    return 0


def _cmd_prune(args) -> int:
    from .rundir import MARKER, RunDir

    from .config import preflight
    job = load_job(args.job, args.overrides)
    if preflight(job):
        raise ConfigError(preflight(job), job.name)
    run = RunDir(job.results_path)
    if not run.is_empty() and not run.is_ours():
        raise ResultsError(f"{run.path} exists and was not written by qpruner (no {MARKER}); nothing was changed. "
                           "Choose another name (name=...) or results_dir")
    created = not run.path.exists()   # only a directory this run creates may be removed again
    try:
        done = _prune_locked(job, run, args.force)
    except BaseException:
        if created:
            run.discard_unstarted()   # failed before any work: no marker, lock or directory left behind
        raise
    for amount, pruned in done:   # one pruned model; or, with prune.param_ratios, one per amount
        print(("reused: " if pruned.reused else "") + pruned.report.summary())
        print(f"pruned model: {run.pruned_at(amount)}/ (load it with `import qpruner` and "
              "transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _prune_locked(job, run, force: bool) -> list:
    from .job import amounts, load_or_prune, prune_key, resolve_device, variant_job
    with run.lock("prune"):
        searched = (run.read_marker() or {}).get("identity") or run.has_trials()  # (no marker: an earlier version)
        stored = searched and run.job_file.is_file() and run.read_job()
        keys = lambda j: [prune_key(variant_job(j, a)) for a in amounts(j)]  # noqa: E731
        if stored and keys(stored) != keys(job):
            raise ResultsError(f"{run.path} holds a searched run whose model was pruned with other settings; "
                               "pruning again there would leave its trials without their model. Give this job a "
                               "new name (name=...)")
        run.write_marker(job, searched=False)
        return [(a, load_or_prune(job, resolve_device(job.device), force=force, check_budget=False, amount=a))
                for a in amounts(job)]


def _cmd_search(args) -> int:
    from .job import describe_uniform, run_job
    from .memory import Budget
    from .report import choice_table, front_table

    job = load_job(args.job, args.overrides)
    outcome = run_job(job, resume=args.resume, overwrite=args.overwrite)
    trials = outcome.trials
    counts = trials["status"].value_counts().to_dict() if not trials.empty else {}
    print()
    if outcome.moved_aside:
        print(f"the earlier run was moved aside to {outcome.moved_aside}/ (nothing was deleted)")
    print(f"QPruner job '{job.name}' {'continued and ' if outcome.continued else ''}finished in {outcome.seconds:.0f}s")
    for amount, variant in outcome.prepared.variants.items():
        label = "" if amount is None else f"[{100 * amount:g}% of the parameters] "
        print(label + variant.prune.summary())
        print(label + describe_uniform(variant.uniform, Budget.from_policy(job.policy)))
    print(f"trials: {len(trials)} ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    print(f"Pareto front ({len(outcome.front)} plans):")
    print(front_table(outcome.front, front_metric(job)))
    choice = choice_table(trials, front_metric(job), outcome.prepared.fixed)
    if choice:
        print("Prune more or quantize more? The best plan within each memory, overall and per pruning amount:")
        print(choice)
    print(f"results: {outcome.directory}/ (report.html, trials.parquet, pareto.parquet, pareto.png, job.yaml, pruned/)")
    if job.search.keep_dashboard:
        from .search.run import hold_dashboard
        hold_dashboard()
    return 0


def _cmd_dashboard(args) -> int:
    from .dashboards import GRAFANA
    if args.out is None:
        print(GRAFANA.read_text(), end="")
        return 0
    out = Path(args.out)
    if out.exists():
        raise ResultsError(f"{out} exists; choose a new file name (nothing was changed)")
    out.write_text(GRAFANA.read_text())
    print(f"wrote {out}: import it in Grafana (Dashboards -> New -> Import)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``qpruner`` argument parser: one sub-command per job stage and tool."""
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
            p.add_argument("--resume", action="store_true", help="continue an interrupted search of this job "
                           "(refused when the job's settings changed)")
            p.add_argument("--overwrite", action="store_true", help="move an earlier, different run in "
                           "results/<job>/ aside (to <job>.replaced-<time>/; never deleted) and start anew")
        p.set_defaults(func=func)
    p = sub.add_parser("export", help="export a front point as a loadable model directory")
    p.add_argument("results", help="a results/<job>/ directory")
    p.add_argument("--point", type=int, default=0, help="front point, 0 = the smallest model (default; "
                   "`qpruner status` lists the points)")
    p.add_argument("--trial", default=None, help="a completed trial instead of --point: its name (t0007) or id")
    p.add_argument("--retrain", action="store_true", help="when the trial's adapter checkpoint is not readable "
                   "here, train the plan again (same seeds, same adapter); without it such an export fails")
    p.add_argument("--out", default=None, help="output directory (default results/<job>/exports/point<K>-<trial>)")
    p.add_argument("--merge", nargs="?", const="bf16", default=None, choices=["bf16", "plan"],
                   help="also write the LoRA-merged model, with its held-out NLL next to the trial's: bf16 (the "
                   "default; <export>/merged/, plain transformers weights) or plan (<export>/merged-quantized/: "
                   "the merged weights quantized again to the plan, no adapter, read by qpruner.load); put it after RESULTS")
    p.add_argument("--format", action="append", choices=["gguf"], default=None,
                   help="also write the point in a serving format: gguf (llama.cpp, Ollama, LM Studio: "
                   "<export>/gguf/*.gguf, the LoRA merged, per-layer widths as llama.cpp's deci architecture), with "
                   "the held-out NLL of the file's weights next to the trial's")
    p.add_argument("--gguf-4bit", default=None, choices=["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"],
                   help="GGUF type of the plan's nf4/fp4 layers (GGUF has no nf4; default q4_0: 4.5 bits/weight)")
    p.add_argument("--gguf-source", default="auto", choices=["auto", "pruned", "merged"],
                   help="GGUF weights from the run's full-precision pruned model + the trained LoRA change (pruned; "
                   "quantized once), or from the export's quantized base with the LoRA merged (merged; quantized "
                   "twice, no run directory needed); auto: pruned when at hand")
    p.add_argument("--lm-eval", default="", metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks: harness names (their datasets "
                   "download) or task YAML files (custom tasks, e.g. over local JSON: offline)")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="items per lm-eval task")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the export to this Hugging Face Hub "
                   "model repository (online; created if missing), after --merge, --format and --lm-eval")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("dashboard", help="the Grafana dashboard JSON for the qpruner Ray metrics")
    p.add_argument("--out", default=None, help="write it to this new file (default: print it)")
    p.set_defaults(func=_cmd_dashboard)
    p = sub.add_parser("status", help="progress and front of a (running) search")
    p.add_argument("results", help="a results/<job>/ directory, a job file, or a Ray job submission id")
    p.add_argument("--address", default=None, help="Ray job API of a submission id (default $RAY_ADDRESS, "
                   "else http://127.0.0.1:8265)")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("report", help="write report.html and the plots of a search")
    p.add_argument("results", help="a results/<job>/ directory")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qpruner`` command: run a sub-command, print errors without tracebacks, return the exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.func(args)
    except SearchIncomplete as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except QPrunerError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named or owns: one clear line, not a traceback
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

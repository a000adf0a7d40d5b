"""Human-readable outputs of a search: the front as a table, PNG plots, and a self-contained HTML report.

``qpruner report RESULTS_DIR`` (also run at the end of every search) writes into the results directory:

* ``pareto.png``      — quality vs. weight memory of every completed trial, the front as a step line;
* ``bits.png``        — per-unit precision of every front plan (a heat-map, one row per plan);
* ``hypervolume.png`` — hypervolume of the front found so far, trial after trial;
* ``report.html``     — all of the above embedded (base64), a summary, and a sortable table of every
  trial (click a column header). No external resources: it opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .pareto import hypervolume, maximize, pareto_front, quality_values, se_column, trial_label

logger = logging.getLogger(__name__)


def _fmt_se(value, se, digits: int) -> str:
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and pd.notna(se) else "")


def front_table(front: pd.DataFrame, metric: str) -> str:
    """The front as a fixed-width text table, smallest model first, with standard errors and whether each
    point is better than its cheaper neighbour by more than noise (2 SE of the paired difference)."""
    if front.empty:
        return "(no completed trial: the front is empty)"
    extra = metric not in ("accuracy", "perplexity")
    unit = "NLL" if metric == "perplexity" else metric
    header = (f"{'point':>5} {'trial':<6} {'id':<10} {'weights MB':>10} {'avg bits':>8} {'perplexity':>17} {'accuracy':>17}"
              + (f" {metric:>18}" if extra else "") + f" {'gain vs cheaper (' + unit + ')':>26}"
              + "  plan (4=nf4 f=fp4 8=int8 H=bf16)")
    joint = _joint(front)
    if joint:
        header = header.replace(f"{'weights MB':>10}", f"{'pruned':>6} {'weights MB':>10}", 1)
    lines = [header, "-" * len(header)]
    unclear = 0
    for point, (_, r) in enumerate(front.iterrows()):
        gain = r.get("gain")
        if gain is None or pd.isna(gain):
            vs = "-"
        else:
            sep = r.get("separable")
            unclear += sep is False
            vs = _fmt_se(gain, r.get("gain_se"), 4) + ("" if sep is not False else " ~")
        pruned = f"{_amount(r.get('prune_param_ratio')):>6} " if joint else ""
        lines.append(f"{point:>5} {trial_label(r):<6} {str(r['trial_id']):<10} {pruned}"
                     f"{r['weight_bytes'] / 1e6:>10.2f} {r['avg_bits']:>8.2f} "
                     f"{_fmt_se(r['perplexity'], r.get('perplexity_se'), 2):>17} "
                     f"{_fmt_se(r['accuracy'], r.get('accuracy_se'), 4):>17}"
                     + (f" {_fmt_se(r[metric], r.get(metric + '_se'), 4):>18}" if extra else "")
                     + f" {vs:>26}  {r['plan_code']}")
    lines.append(f"objective: {'max' if maximize(metric) else 'min'} {metric}; ± one standard error over evaluation "
                 "windows; gain: paired difference on the same tokens; export a point with `qpruner export DIR "
                 "--point N` (or --trial t0007)")
    if unclear:
        lines.append(f"~ : {unclear} point(s) not better than the cheaper neighbour by more than 2 SE "
                     "(within evaluation noise)")
    return "\n".join(lines)


def _joint(frame: pd.DataFrame) -> bool:
    """Rows of a joint search (pruning amount and precision) carry ``prune_param_ratio``."""
    return not frame.empty and "prune_param_ratio" in frame and bool(frame["prune_param_ratio"].notna().any())


def _amount(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{100 * float(value):g}%"


def choice_table(trials: pd.DataFrame, metric: str, fixed: float | None = None, levels: int = 6) -> str:
    """A joint search's answer to "prune more or quantize more?": at ``levels`` memory levels, evenly spaced
    from the smallest to the largest trained plan, the best plan overall and the best plan of each pruning
    amount within that memory (``*`` marks the job's fixed amount, ``prune.param_ratio``). Quality ± one
    standard error; a difference smaller than about two of them is not a result."""
    ok = trials[(trials["status"] == "ok") & trials[metric].notna()] if _joint(trials) else trials.iloc[0:0]
    if ok.empty:
        return ""
    memory = ok["weight_bytes"].astype(float)
    grid = sorted({float(m) for m in np.linspace(memory.min(), memory.max(), max(1, levels))})
    amounts = sorted(float(a) for a in ok["prune_param_ratio"].dropna().unique())
    better = (lambda a, b: a > b) if maximize(metric) else (lambda a, b: a < b)
    se = se_column(metric)

    def best(rows):
        top = None
        for _, r in rows.iterrows():
            if top is None or better(float(r[metric]), float(top[metric])):
                top = r
        return top

    def shown(r):
        if r is None:
            return "-"
        err = r.get(se)
        return f"{float(r[metric]):.4g}" + (f" ± {float(err):.2g}" if err is not None and pd.notna(err) else "")

    names = [f"{_amount(a)}{'*' if fixed is not None and abs(a - fixed) < 1e-9 else ''}" for a in amounts]
    header = f"{'memory <= MB':>12}  {'best overall':<34}" + "".join(f" {('pruned ' + n):>20}" for n in names)
    lines = [header, "-" * len(header)]
    for level in grid:
        within = ok[memory <= level + 0.5]
        top = best(within)
        overall = f"{_amount(top['prune_param_ratio'])} {top['plan_code']} {shown(top)}"
        cells = [shown(best(within[(within["prune_param_ratio"] - a).abs() < 1e-9])) for a in amounts]
        lines.append(f"{level / 1e6:>12.2f}  {overall[:34]:<34}" + "".join(f" {c:>20}" for c in cells))
    lines.append(f"{metric} of the best plan within each memory ({'higher' if maximize(metric) else 'lower'} is better; "
                 "± one standard error over evaluation windows)" + ("; * the job's fixed amount" if fixed is not None
                                                                   else ""))
    return "\n".join(lines)


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a reader (or a search rewriting it) never sees half a file."""
    import os
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_figure(fig, path: Path) -> None:
    _atomic(Path(path), lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png"))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_front(trials: pd.DataFrame, front: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """Scatter every completed trial (memory vs metric) and draw the front as a step line."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ok = trials[trials["status"] == "ok"] if not trials.empty and "status" in trials else trials.iloc[0:0]
    se = se_column(metric)
    if _joint(ok):  # colour = pruning amount
        for amount in sorted(ok["prune_param_ratio"].dropna().unique()):
            part = ok[(ok["prune_param_ratio"] - amount).abs() < 1e-9]
            ax.errorbar(part["weight_bytes"] / 1e6, part[metric],
                        yerr=part[se].astype(float) if se in part else None, fmt="o", alpha=0.7,
                        capsize=2, elinewidth=0.7, label=f"pruned {_amount(amount)} ({len(part)})")
    elif not ok.empty:
        for origin, marker in (("searcher", "o"), ("seed:sampled", "s"), ("seed:best_guess", "^"),
                               ("seed:uniform", "D")):
            part = ok[ok["origin"] == origin]
            if not part.empty:
                ax.errorbar(part["weight_bytes"] / 1e6, part[metric],
                            yerr=part[se].astype(float) if se in part else None, fmt=marker, alpha=0.6,
                            capsize=2, elinewidth=0.7, label=f"{origin} ({len(part)})")
    if not front.empty:
        ax.step(front["weight_bytes"] / 1e6, front[metric], where="post" if maximize(metric) else "pre",
                color="black", linewidth=1.2, label=f"Pareto front ({len(front)})")
        if "gain_se" in front:  # bold: the paired SE of each step up the front, in the metric's units
            step_se = front["gain_se"].astype(float).fillna(0.0)
            if metric == "perplexity":
                step_se = step_se * front["perplexity"].astype(float)
            ax.errorbar(front["weight_bytes"] / 1e6, front[metric], yerr=step_se, fmt="none", ecolor="black",
                        capsize=4, elinewidth=2.5, label="step up the front: ±1 SE (paired)")
        ax.scatter(front["weight_bytes"] / 1e6, front[metric], facecolors="none", edgecolors="black", s=90)
        unclear = front[front["separable"] == False] if "separable" in front else front.iloc[0:0]  # noqa: E712
        if not unclear.empty:
            ax.scatter(unclear["weight_bytes"] / 1e6, unclear[metric], marker="x", color="red", s=70, zorder=5,
                       label=f"within noise of the cheaper neighbour ({len(unclear)})")
        for point, (_, r) in enumerate(front.iterrows()):
            ax.annotate(f"#{point} {trial_label(r)} {r['avg_bits']:.2f}b", (r["weight_bytes"] / 1e6, r[metric]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("weight memory (MB)    [thin bars: ±1 SE of each value; bold: ±1 SE of each front step, paired]",
                  fontsize=8)
    ax.set_ylabel(f"{metric} ({'higher' if maximize(metric) else 'lower'} is better)")
    ax.set_title("QPruner: quality vs. memory of the quantized pruned model")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_bits(front: pd.DataFrame, path: str | Path) -> Path:
    """Heat-map: one row per front plan (smallest first), one column per unit, colour = bits."""
    import numpy as np
    plt = _pyplot()
    path = Path(path)
    rows = [list(b) for b in front["bits"]] if not front.empty else [[0]]
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.8 + 0.4 * len(rows))), dpi=120)
    image = ax.imshow(np.array(rows, dtype=float), aspect="auto", cmap="viridis", vmin=4, vmax=16)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # units are indices: never 2.5
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"#{i} {trial_label(r)} ({r['weight_bytes'] / 1e6:.1f} MB)"
                        for i, (_, r) in enumerate(front.iterrows())]
                       if not front.empty else ["(empty)"], fontsize=7)
    ax.set_xlabel(f"unit ({front['plan_unit'].iloc[0] if not front.empty and 'plan_unit' in front else 'layer'})")
    ax.set_title("bits per unit of each front plan")
    fig.colorbar(image, ax=ax, ticks=[4, 8, 16], label="bits")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def hypervolume_curve(trials: pd.DataFrame, metric: str, ref: tuple[float, float] | None = None) -> list[float]:
    """Hypervolume of the front of the completed trials so far, after each trial (in finishing order):
    against ``ref = (q_ref, cost_ref)`` when given (the search's fixed reference, as in its log, its Tune
    metrics and ``qpruner status``), else a reference 10% beyond the worst quality and largest memory seen."""
    if trials.empty or "status" not in trials:
        return []
    ordered = trials.sort_values("finished_at")
    ok = ordered[(ordered["status"] == "ok") & ordered[metric].notna()]
    if ok.empty:
        return [0.0] * len(ordered)
    q_all, m_all = quality_values(ok, metric), ok["weight_bytes"].astype(float).tolist()
    # reference point 10% of the range beyond the worst quality and the largest memory seen, so that the
    # extreme points of the front (e.g. the smallest, least accurate plan) add area too
    q_span, m_span = max(q_all) - min(q_all), max(m_all) - min(m_all)
    ref = ref or (min(q_all) - 0.1 * (q_span or abs(min(q_all)) or 1.0), max(m_all) + 0.1 * (m_span or max(m_all) or 1.0))
    curve, q, m = [], [], []
    for _, row in ordered.iterrows():
        if row["status"] == "ok" and pd.notna(row.get(metric)):
            q.append(quality_values(pd.DataFrame([row]), metric)[0])
            m.append(float(row["weight_bytes"]))
        curve.append(hypervolume(q, m, ref))
    return curve


def plot_hypervolume(curve: list[float], path: str | Path) -> Path:
    """Plot the front's hypervolume after each finished trial to ``path``."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 3), dpi=120)
    ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3)
    ax.set_xlabel("trials finished (trained, screened or failed)")
    ax.set_ylabel("hypervolume (quality x bytes)")
    ax.set_title("hypervolume of the front over the search")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# HTML


_COLUMNS = [("point", "point"), ("trial_name", "trial"), ("trial_id", "id"), ("status", "status"), ("origin", "origin"),
            ("avg_bits", "avg bits"),
            ("weight_bytes", "weights MB"), ("perplexity", "perplexity"), ("perplexity_se", "± SE"),
            ("accuracy", "accuracy"), ("accuracy_se", "± SE"), ("objective", "objective"),
            ("peak_bytes_estimate", "FT peak est. MB"), ("seconds_total", "seconds"),
            ("prune_param_ratio", "pruned"), ("plan_code", "plan")]
TEXT_COLUMNS = ("trial_name", "trial_id", "status", "origin")

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#eee;cursor:pointer;position:sticky;top:0}td.l,th.l{text-align:left}td.plan{font-family:monospace}
.kv td{text-align:left}img{max-width:100%;border:1px solid #ddd}.front{background:#fff7d6}"""

_JS = """function sortTable(col){const t=document.getElementById('trials');const b=t.tBodies[0];
const rows=Array.from(b.rows);const asc=t.dataset.col==col&&t.dataset.dir!='asc';
rows.sort((x,y)=>{const a=x.cells[col].dataset.v,c=y.cells[col].dataset.v;const na=parseFloat(a),nc=parseFloat(c);
const r=(!isNaN(na)&&!isNaN(nc))?na-nc:String(a).localeCompare(String(c));return asc?r:-r;});
rows.forEach(r=>b.appendChild(r));t.dataset.col=col;t.dataset.dir=asc?'asc':'desc';}
window.addEventListener('load',()=>{const img=document.getElementById('front-plot');
document.body.dataset.frontLoaded=(img&&img.complete&&img.naturalWidth>0)?img.naturalWidth:0;
document.body.dataset.rows=document.getElementById('trials').tBodies[0].rows.length;
if(img){const r=img.getBoundingClientRect();
document.body.dataset.frontBox=[r.left+1,r.top+1,r.width-2,r.height-2].map(Math.round).join(',');}});"""


def _img(path: Path, alt: str, ident: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img {f"id={ident!r} " if ident else ""}alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(value, column: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return '<td data-v=""></td>'
    shown = value
    if column in ("weight_bytes", "peak_bytes_estimate"):
        shown = f"{value / 1e6:.2f}"
    elif isinstance(value, float):
        shown = f"{value:.4g}"
    cls = ' class="l plan"' if column == "plan_code" else (' class="l"' if column in TEXT_COLUMNS else "")
    return f'<td{cls} data-v="{html.escape(str(value))}">{html.escape(str(shown))}</td>'


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _screen_windows(run) -> str:
    try:
        return str(run.read_job().search.screen_windows)
    except Exception:  # noqa: BLE001 - a report of a changed or broken job.yaml still shows the trials
        return "?"


def write_report(directory: str | Path, metric: str | None = None) -> Path:
    """Write pareto.png, bits.png, hypervolume.png and report.html into ``directory``."""
    from .rundir import RunDir
    run = RunDir(directory)
    directory = run.path
    trials = run.trials() if run.has_trials() else pd.DataFrame()
    if metric is None:
        metric = run.front_metric() if run.job_file.is_file() else "accuracy"
    front = pareto_front(trials, metric)
    ref = run.reference()   # the search's fixed reference: the same hypervolume as `qpruner status`
    curve = hypervolume_curve(trials, metric, ref)
    pngs = {"front": plot_front(trials, front, metric, directory / "pareto.png"),
            "bits": plot_bits(front, directory / "bits.png"),
            "hv": plot_hypervolume(curve, directory / "hypervolume.png")}
    prune = _read_json(directory / "prune.json") or {}
    variants = {p.stem[len("prune-p"):]: _read_json(p) or {} for p in sorted(directory.glob("prune-p*.json"))}
    fixed = None
    if variants and run.job_file.is_file():
        try:
            fixed = run.read_job().prune.param_ratio
        except Exception:  # noqa: BLE001 - a report of a changed or broken job.yaml still shows the trials
            fixed = None
    choice = choice_table(trials, metric, fixed) if not trials.empty else ""
    counts = trials["status"].value_counts().to_dict() if not trials.empty and "status" in trials else {}
    front_ids = set(front["trial_id"]) if not front.empty else set()
    summary = [("job", directory.name), ("quality metric", f"{metric} ({'max' if maximize(metric) else 'min'})"),
               ("pruning", f"{prune.get('params_before', 0):,} -> {prune.get('params_after', 0):,} parameters"
                           f" ({prune.get('scope', '?')}, {prune.get('importance', '?')})" if prune else
                           "; ".join(f"{k}%: {v.get('params_before', 0):,} -> {v.get('params_after', 0):,}"
                                     for k, v in sorted(variants.items(), key=lambda kv: float(kv[0])))
                           + " parameters (joint search)" if variants else "(unknown)"),
               ("trials", ", ".join(f"{v} {k}" for k, v in counts.items()) or "none"),
               *([("fidelity", f"{counts['screened']} screens: zero-step evaluations on the first "
                                f"{_screen_windows(run)} evaluation windows (search.screen_share); another fidelity, "
                                "so never on the front or in the hypervolume; every front plan is fine-tuned")]
                 if counts.get("screened") else []),
               ("front", f"{len(front)} plans"),
               ("hypervolume", (f"{curve[-1]:.4g}" if curve else "0")
                + ("" if ref else " (reference: 10% beyond the worst quality and largest memory seen)"))]
    rows = []
    points = {tid: i for i, tid in enumerate(front["trial_id"])} if not front.empty else {}
    for _, r in trials.iterrows():
        cls = ' class="front"' if r.get("trial_id") in front_ids else ""
        shown = {c: r.get(c) for c, _ in _COLUMNS}
        shown["point"] = points.get(r.get("trial_id"))   # the N of `qpruner export --point N`
        shown["trial_name"] = trial_label(r)
        rows.append(f"<tr{cls}>" + "".join(_cell(shown[c], c) for c, _ in _COLUMNS) + "</tr>")
    header = "".join(f'<th class="{"l" if c in TEXT_COLUMNS or c == "plan_code" else ""}" '
                     f'onclick="sortTable({i})">{html.escape(label)}</th>' for i, (c, label) in enumerate(_COLUMNS))
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>QPruner report: {html.escape(directory.name)}</title>
<style>{_CSS}</style><script>{_JS}</script></head><body>
<h1>QPruner report: {html.escape(directory.name)}</h1>
<table class="kv">{''.join(f'<tr><th class="l">{html.escape(k)}</th><td>{html.escape(v)}</td></tr>' for k, v in summary)}</table>
<h2>Pareto front</h2>{_img(pngs['front'], 'quality vs memory with the Pareto front', 'front-plot')}
<p>Thin error bars: one standard error of each value over evaluation windows (how far it could move on other text).
Bold bars on the front: one standard error of each step up the front, paired on the same tokens (what tells
neighbours apart). A red cross marks a front point that is not better than its cheaper neighbour by more than 2
paired standard errors.</p>
<pre>{html.escape(front_table(front, metric))}</pre>
{f'<h2>Prune more or quantize more?</h2><pre>{html.escape(choice)}</pre>' if choice else ''}
<h2>Bits per unit of each front plan</h2>{_img(pngs['bits'], 'bits heat-map')}
<h2>Hypervolume over trials</h2>{_img(pngs['hv'], 'hypervolume over trials')}
<h2>All trials <small>(click a header to sort; front plans highlighted)</small></h2>
<table id="trials"><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>
</body></html>"""
    out = directory / "report.html"
    _atomic(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    logger.info("wrote %s", out)
    return out

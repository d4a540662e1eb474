"""`eopd-pipe report` and `eopd-pipe compare`: PNG plots of what runs wrote.

Recipe (report RUN_DIR):
  1. training metrics: every RUN_DIR/round-*/train/metrics.jsonl in round order; x = global_step
  2. one PNG per diagnostic the paper plots (loss parts; gate fraction; teacher and student token
     entropy; FKL on high-entropy teacher tokens; the student's top-10 change rate), with dotted
     vertical lines at round boundaries
  3. eval: pass@k against k, one line per RUN_DIR/eval/*.json
  4. a plot without data is skipped; a run with nothing to plot at all is an error

Recipe (compare RUN_A RUN_B ... --out DIR):
  1. per run: the objective and seed (RUN_DIR/config.yaml), its `final`, `base` and `teacher`
     evals, its last round's metrics
  2. a text table side by side, and DIR/compare.png: pass@k of each run's final model (base model
     dashed) and student entropy over training; the table also goes to DIR/compare.txt
  3. when two or more runs share an objective (seeds of one setting): a second table with the
     mean +- sample standard deviation of every column per objective (the base student and the
     teacher as rows of their own), and a plot with error bars instead (pass@k, final pass@1 per
     seed, student entropy with a +-1 std band); the seeds are named in table and plot
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.config import load_yaml
from pipeline import storage
from pipeline.errors import UserError
from pipeline.rundir import RunDir, atomic_write_text
from stages.eval import render_table

# (file name, title, y label, metric keys) of the training plots.
TRAIN_PLOTS = [
    ("train_loss.png", "Loss parts (per response token)", "nats", ["loss", "rkl", "fkl"]),
    ("train_gate_fraction.png", "Share of tokens with teacher entropy above the gate", "fraction", ["gate_fraction"]),
    ("train_entropy.png", "Token entropy", "nats", ["teacher_entropy", "student_entropy", "student_entropy_high_entropy"]),
    ("train_fkl_high_entropy.png", "Forward KL on high-entropy teacher tokens", "nats", ["fkl_high_entropy"]),
    ("train_top10_change.png", "Student top-10 change rate between steps (Jaccard distance)", "distance", ["top10_change"]),
]
_MODEL_ORDER = re.compile(r"round-(\d+)")


# ----------------------------------------------------------------------------- reading


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of one metrics.jsonl. A torn last line (training killed mid-write) is skipped;
    a bad line elsewhere is an error naming the file and line."""
    lines = storage.read_text(path).splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue
            raise UserError(f"{path}, line {n}: not valid JSON; the metrics file is damaged (delete the line, "
                            f"or the file to drop this round's curves)") from None
        if not isinstance(rec, dict) or "global_step" not in rec:
            raise UserError(f"{path}, line {n}: expected a metrics record with a 'global_step' field")
        records.append(rec)
    return records


def run_metrics(run: RunDir) -> dict[int, list[dict[str, Any]]]:
    """round -> its metrics records (rounds without a metrics file or records left out)."""
    out = {}
    for r in run.rounds_present():
        path = run.stage_dir(r, "train") / "metrics.jsonl"
        if storage.is_file(path) and (records := read_metrics(path)):
            out[r] = records
    return out


def read_eval(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); run `eopd-pipe eval` for that model again") from None
    if not isinstance(result, dict) or not isinstance(result.get("pass_at_k"), dict):
        raise UserError(f"{path}: not an eval result (no 'pass_at_k'); remove it or run `eopd-pipe eval` again")
    return result


def _model_key(name: str) -> tuple:
    m = _MODEL_ORDER.fullmatch(name)
    rank = {"base": 0, "final": 2, "teacher": 3}.get(name, 4)
    return (1, int(m.group(1)), name) if m else (rank, 0, name)


def run_evals(run: RunDir) -> dict[str, dict[str, Any]]:
    """model name -> eval result, in the order base, round-N..., final, teacher, others."""
    d = run.root / "eval"
    found = {p.stem: read_eval(p) for p in (d / n for n in storage.names(d, "*.json")) if storage.is_file(p)}
    return {name: found[name] for name in sorted(found, key=_model_key)}


def pass_curve(result: dict[str, Any]) -> tuple[list[int], list[float]]:
    ks = sorted(int(k) for k in result["pass_at_k"])
    return ks, [result["pass_at_k"][str(k)] for k in ks]


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(global steps, values) of one metric, leaving out records without it and NaNs."""
    xs, ys = [], []
    for rec in records:
        value = rec.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(rec["global_step"])
            ys.append(float(value))
    return xs, ys


def _nanmean(values: Sequence[Any]) -> float:
    good = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(good) / len(good) if good else math.nan


# ----------------------------------------------------------------------------- drawing


def _figure(ncols: int = 1):
    # The object API (no pyplot): no global backend or figure state, Agg rendering.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * ncols, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def save_png(fig, path) -> Path:
    """Render to a temporary file, then give it its final name (rename, or one PUT on a bucket):
    readers never see half a PNG."""
    storage.write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), doing="write the plot")
    return path


ROUND_LINES_MAX = 20  # more round boundaries than this draw a grey curtain over the curves: left out


def _round_lines(ax, metrics: dict[int, list[dict[str, Any]]]) -> bool:
    """Dotted vertical lines between rounds (after each round's last step but the final one), only
    where there are few rounds. Returns whether they were drawn."""
    rounds = sorted(metrics)
    if len(rounds) > ROUND_LINES_MAX:
        return False
    for r in rounds[:-1]:
        ax.axvline(max(rec["global_step"] for rec in metrics[r]) + 0.5, color="grey", linestyle=":", linewidth=1)
    return len(rounds) > 1


def smooth(ys: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (fewer at the start): what a smoothed curve in
    TensorBoard or W&B shows, without their exponential bias at the start."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    """About 2% of the points (1 below 50 points: no smoothing)."""
    return 1 if n < 50 else max(2, n // 50)


def _plot_series(ax, xs: list[int], ys: list[float], label: str, color) -> int:
    """A curve: the raw values faint and their moving average over them when there are many
    points; returns the window (1: raw only)."""
    w = smoothing_window(len(xs))
    if w == 1:
        ax.plot(xs, ys, label=label, color=color, marker="." if len(xs) <= 50 else None, linewidth=1.2)
    else:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.6)
        ax.plot(xs, smooth(ys, w), label=label, color=color, linewidth=1.6)
    return w


def _style_passk(ax, max_k: int) -> None:
    if max_k >= 8:  # the paper's curves: k on a log2 axis, ticks 1, 2, 4, ...
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.set_xticks([2 ** i for i in range(max_k.bit_length())])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter("")
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def plot_training(metrics: dict[int, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    records = [rec for r in sorted(metrics) for rec in metrics[r]]
    written = []
    for name, title, ylabel, keys in TRAIN_PLOTS:
        curves = {k: _series(records, k) for k in keys}
        curves = {k: xy for k, xy in curves.items() if xy[0]}
        if not curves:
            continue
        fig, (ax,) = _figure()
        window = 1
        for i, (key, (xs, ys)) in enumerate(curves.items()):
            window = max(window, _plot_series(ax, xs, ys, key, colors[i % len(colors)]))
        lines = _round_lines(ax, metrics)
        notes = [f"{len(metrics)} rounds"] if len(metrics) > 1 else []
        if lines:
            notes.append("dotted: round boundaries")
        if window > 1:
            notes.append(f"faint: per step; solid: mean of {window} steps")
        ax.set_title(title + ("\n" + ", ".join(notes) if notes else ""), fontsize=10)
        ax.set_xlabel("global step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(save_png(fig, out_dir / name))
    return written


def read_curve(run: RunDir) -> dict[str, dict[str, Any]]:
    """The learning curve's evals (RUN_DIR/eval/curve/*.json, see stages/run.py: Watch): model -> result."""
    out = {}
    d = run.root / "eval" / "curve"
    for path in (d / n for n in storage.names(d, "*.json")):
        out[path.stem] = read_eval(path)
    return out


def plot_curve(curve: dict[str, dict[str, Any]], evals: dict[str, dict[str, Any]], out_dir: Path) -> Path | None:
    """pass@1 (and pass@k at the largest k) of the student against the optimiser step, base student
    and teacher as horizontal lines (their curve evals on the same problems, else the full evals)."""
    points = sorted(((int(r.get("global_step", 0)), r) for m, r in curve.items() if m not in ("teacher",)),
                    key=lambda p: p[0])
    if not points:
        return None
    fig, (ax,) = _figure()
    kmax = max(int(k) for _, r in points for k in r["pass_at_k"])
    xs = [x for x, _ in points]
    ax.plot(xs, [100 * r["pass_at_k"]["1"] for _, r in points], marker="o", color="C0", label="student pass@1")
    if kmax > 1:
        ax.plot(xs, [100 * r["pass_at_k"].get(str(kmax), math.nan) for _, r in points], marker=".", color="C0",
                alpha=0.5, linestyle="--", label=f"student pass@{kmax}")
    same = True
    for who, style in (("base", dict(color="grey", linestyle="--")), ("teacher", dict(color="black", linestyle=":"))):
        result = curve.get(who)
        if result is None:
            result, same = evals.get(who), False if evals.get(who) else same
        if result is not None:
            ax.axhline(100 * result["pass_at_k"]["1"], label=f"{who} pass@1", linewidth=1.2, **style)
    problems = points[-1][1].get("problems", "?")
    samples = points[-1][1].get("samples", "?")
    ax.set_title(f"Learning curve: pass@1 during training\n{problems} eval problems x {samples} samples per point"
                 + ("" if same else "; lines without a curve eval: the full eval"), fontsize=10)
    ax.set_xlabel("global step")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, out_dir / "eval_curve.png")


def plot_eval(evals: dict[str, dict[str, Any]], out_dir: Path, title: str) -> Path:
    fig, (ax,) = _figure()
    max_k = 1
    for name, result in evals.items():
        ks, ps = pass_curve(result)
        max_k = max(max_k, ks[-1])
        ax.plot(ks, ps, marker="o", label=f"{name} (Avg@{result.get('samples', ks[-1])} {result.get('avg_at_k', ps[0]):.3f})")
    _style_passk(ax, max_k)
    ax.set_title(title, fontsize=10, wrap=True)
    ax.legend()
    return save_png(fig, out_dir / "eval_pass_at_k.png")


def make_report(run: RunDir) -> list[Path]:
    """Every plot the run's data allows, into RUN_DIR/report/; returns the written paths."""
    if not storage.is_dir(run.root):
        raise UserError(f"{run.root} does not exist; give the RUN_DIR of a run")
    out_dir = run.root / "report"
    metrics = run_metrics(run)
    evals = run_evals(run)
    if not metrics and not evals:
        raise UserError(f"nothing to plot in RUN_DIR {run.root}: no round-*/train/metrics.jsonl and no eval/*.json yet; "
                        f"run `eopd-pipe train` or `eopd-pipe eval` first")
    written = plot_training(metrics, out_dir) if metrics else []
    curve = plot_curve(read_curve(run), evals, out_dir)
    if curve is not None:
        written.append(curve)
    if evals:
        seed = next((r.get("seed") for r in evals.values() if r.get("seed") is not None), None)
        samples = next((r.get("samples") for r in evals.values() if r.get("samples")), "?")
        problems = next((r.get("problems") for r in evals.values() if r.get("problems")), "?")
        written.append(plot_eval(evals, out_dir, f"pass@k on the eval problems ({run.root.name})\n"
                                                 f"seed {seed}: one run, no spread over seeds; {problems} problems x "
                                                 f"{samples} samples"))
    return written


# ----------------------------------------------------------------------------- comparing runs


@dataclass
class RunSummary:
    label: str
    objective: str
    final: dict[str, Any] | None
    base: dict[str, Any] | None
    metrics: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    seed: Any = None
    teacher: dict[str, Any] | None = None


def describe_objective(cfg: dict[str, Any]) -> str:
    """e.g. 'eopd tau=0.8 lam=1', 'rkl', 'full lam=1', 'eopd q=0.5 lam=1' (quantile gate)."""
    t = cfg.get("train") or {}
    objective = t.get("objective", "eopd")
    if objective == "eopd":
        gate = f"q={t['gate_quantile']:g}" if t.get("gate_quantile") is not None else f"tau={t.get('tau', 0.8):g}"
        return f"eopd {gate} lam={t.get('lam', 1.0):g}"
    if objective == "full":
        return f"full lam={t.get('lam', 1.0):g}"
    if objective == "jsd":
        return f"jsd beta={t.get('jsd_beta', 0.5):g}"
    return str(objective)


def summarize_run(run: RunDir, label: str) -> RunSummary:
    if not storage.is_file(run.config_path):
        raise UserError(f"{run.root} has no config.yaml: not a run directory of eopd-pipe (give RUN_DIRs that "
                        f"`eopd-pipe run` or a stage has written)")
    try:
        cfg = load_yaml(storage.read_text(run.config_path)) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{run.config_path} is not valid YAML: {e}") from None
    evals = run_evals(run)
    return RunSummary(label, describe_objective(cfg), evals.get("final"), evals.get("base"), run_metrics(run),
                      seed=cfg.get("seed"), teacher=evals.get("teacher"))


def _labels(runs: Sequence[RunDir]) -> list[str]:
    """Run directory names, with the parent added where two names clash."""
    names = [r.root.name for r in runs]
    return [f"{r.root.parent.name}/{r.root.name}" if names.count(r.root.name) > 1 else r.root.name for r in runs]


def _fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{scale * value:.{digits}f}"


# The compared columns: (header, value of a run's summary); eval columns read the final model.
def _eval_columns(result: dict[str, Any] | None) -> list[float]:
    f = result or {}
    passk = f.get("pass_at_k", {})
    nan = math.nan
    return [100 * passk.get("1", nan), 100 * passk.get(str(f.get("samples")), nan), 100 * f.get("avg_at_k", nan),
            f.get("mean_token_entropy", nan), f.get("mean_distinct_correct", nan)]


def _train_columns(s: RunSummary) -> list[float]:
    last = s.metrics[max(s.metrics)] if s.metrics else []
    return [_nanmean([r.get(k) for r in last])
            for k in ("student_entropy", "student_entropy_high_entropy", "fkl_high_entropy", "gate_fraction")]


VALUE_HEADER = ["pass@1", "pass@k", "Avg@k", "entropy", "distinct ok",
                "train H(student)", "H(student) high-H", "FKL high-H", "gate frac"]
VALUE_DIGITS = [1, 1, 1, 3, 2, 3, 3, 3, 3]
TABLE_NOTE = ("\n(eval of each run's final model: pass@k, Avg@k in %, k = samples per problem, entropy = mean token entropy"
              "\n in nats, distinct ok = distinct correct responses per problem (solution paths); training means over"
              "\n the last round's steps: student token entropy (all tokens; on teacher tokens above the entropy gate),"
              "\n forward KL on those gated tokens, share of tokens gated)")


def _values(s: RunSummary) -> list[float]:
    return _eval_columns(s.final) + _train_columns(s)


def compare_table(summaries: Sequence[RunSummary]) -> str:
    header = ["run", "objective", "seed", "k", *VALUE_HEADER]
    rows = []
    for s in summaries:
        f = s.final or {}
        rows.append([s.label, s.objective, "-" if s.seed is None else str(s.seed), str(f.get("samples", "-")),
                     *(_fmt(v, digits=d) for v, d in zip(_values(s), VALUE_DIGITS))])
    return render_table(header, rows) + TABLE_NOTE


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (n - 1), n) of the finite values; std NaN below 2 values."""
    good = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not good:
        return math.nan, math.nan, 0
    mean = sum(good) / len(good)
    std = math.sqrt(sum((v - mean) ** 2 for v in good) / (len(good) - 1)) if len(good) > 1 else math.nan
    return mean, std, len(good)


def _pm(values: Sequence[float], digits: int) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def group_by_objective(summaries: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(s.objective, []).append(s)
    return groups


def _seeds(runs: Sequence[RunSummary]) -> str:
    return ",".join("?" if s.seed is None else str(s.seed) for s in runs)


def grouped_table(summaries: Sequence[RunSummary]) -> str:
    """Mean ± sample std over the runs of each objective (and of the base student and teacher
    evals the runs hold), every column of compare_table."""
    header = ["objective", "runs", "seeds", *VALUE_HEADER]
    rows = []
    for who in ("base", "teacher"):
        found = [s for s in summaries if getattr(s, who)]
        if found:
            cols = list(zip(*[_eval_columns(getattr(s, who)) for s in found]))
            rows.append([f"{who} student" if who == "base" else who, str(len(found)), _seeds(found),
                         *(_pm(c, d) for c, d in zip(cols, VALUE_DIGITS)), *["-"] * 4])
    for objective, runs in group_by_objective(summaries).items():
        cols = list(zip(*[_values(s) for s in runs]))
        rows.append([objective, str(len(runs)), _seeds(runs), *(_pm(c, d) for c, d in zip(cols, VALUE_DIGITS))])
    return (render_table(header, rows) + "\n(mean ± sample standard deviation over the runs of each row, seeds named;"
            "\n base student and teacher: their evals in those runs, sampled with each run's seed)")


def _legend(s: RunSummary) -> str:
    return s.label if s.label == s.objective else f"{s.label} ({s.objective})"


def compare_runs(runs: Sequence[RunDir], out_dir: Path) -> tuple[str, Path]:
    """Several runs side by side: (text table, path of out_dir/compare.png)."""
    if not runs:
        raise UserError("compare needs at least one RUN_DIR")
    for run in runs:
        if not storage.is_dir(run.root):
            raise UserError(f"{run.root} does not exist; give the RUN_DIRs of existing runs")
    summaries = [summarize_run(run, label) for run, label in zip(runs, _labels(runs))]
    if not any(s.final or s.metrics for s in summaries):
        raise UserError("nothing to compare: none of " + ", ".join(str(r.root) for r in runs)
                        + " has an eval/final.json or training metrics yet; run `eopd-pipe run` (or train and "
                        "`eopd-pipe eval RUN_DIR --model final`) first")
    table = compare_table(summaries)
    grouped = any(len(g) > 1 for g in group_by_objective(summaries).values())
    if grouped:
        table += "\n\n" + grouped_table(summaries)
        fig = _grouped_figure(summaries)
        out_dir = Path(out_dir)
        png = save_png(fig, out_dir / "compare.png")
        atomic_write_text(out_dir / "compare.txt", table + "\n")
        return table, png

    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    fig, (ax_pass, ax_ent) = _figure(2)
    max_k, any_pass, any_ent = 1, False, False
    for i, s in enumerate(summaries):
        color = colors[i % len(colors)]
        if s.final:
            ks, ps = pass_curve(s.final)
            ax_pass.plot(ks, ps, marker="o", color=color, label=_legend(s))
            max_k, any_pass = max(max_k, ks[-1]), True
        if s.base:
            ks, ps = pass_curve(s.base)
            ax_pass.plot(ks, ps, linestyle="--", color=color, alpha=0.7, label=f"{s.label}: base")
            max_k, any_pass = max(max_k, ks[-1]), True
        records = [rec for r in sorted(s.metrics) for rec in s.metrics[r]]
        xs, ys = _series(records, "student_entropy")
        if xs:
            ax_ent.plot(xs, ys, color=color, linewidth=1.2, label=_legend(s))
            any_ent = True
    _style_passk(ax_pass, max_k)
    ax_pass.set_title("pass@k of the final student (dashed: base)" if any_pass else "no eval/final.json in these runs",
                      fontsize=10)
    if any_pass:
        ax_pass.legend(fontsize=8)
    ax_ent.set_title("student token entropy during training" if any_ent else "no training metrics in these runs",
                     fontsize=10)
    ax_ent.set_xlabel("global step")
    ax_ent.set_ylabel("nats")
    ax_ent.grid(alpha=0.3)
    if any_ent:
        ax_ent.legend(fontsize=8)
    out_dir = Path(out_dir)
    png = save_png(fig, out_dir / "compare.png")
    atomic_write_text(out_dir / "compare.txt", table + "\n")
    return table, png


def _grouped_figure(summaries: Sequence[RunSummary]):
    """Error-bar plot of runs grouped by objective: pass@k mean ± std (base student and teacher
    too), final pass@1 of every seed with the group mean ± std, student entropy mean ± std."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    fig, (ax_pass, ax_one, ax_ent) = _figure(3)
    groups = group_by_objective(summaries)
    max_k = 1

    def curve(results, label, **style):
        nonlocal max_k
        curves = [dict(zip(*pass_curve(r))) for r in results]
        ks = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [mean_std([c[k] for c in curves]) for k in ks]  # fractions, as _style_passk's axis
        ax_pass.errorbar(ks, [m for m, _, _ in stats], yerr=[0 if math.isnan(sd) else sd for _, sd, _ in stats],
                         capsize=3, label=label, **style)
        max_k = max(max_k, ks[-1])

    for who, style in (("base", dict(color="grey", linestyle="--")), ("teacher", dict(color="black", linestyle=":"))):
        found = [s for s in summaries if getattr(s, who)]
        if found:
            curve([getattr(s, who) for s in found], f"{'base student' if who == 'base' else who} "
                  f"(seeds {_seeds(found)})", **style)
    names = list(groups)
    for i, (objective, runs) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        finals = [s for s in runs if s.final]
        if finals:
            curve([s.final for s in finals], f"{objective} (seeds {_seeds(finals)})", color=color, marker="o")
            ones = [100 * s.final["pass_at_k"]["1"] for s in finals]
            mean, std, _ = mean_std(ones)
            ax_one.bar(i, mean, yerr=0 if math.isnan(std) else std, capsize=5, color=color, alpha=0.5)
            ax_one.scatter([i] * len(ones), ones, color=color, zorder=3, s=14)
        by_step: dict[int, list[float]] = {}
        for s in runs:
            for x, y in zip(*_series([rec for r in sorted(s.metrics) for rec in s.metrics[r]], "student_entropy")):
                by_step.setdefault(x, []).append(y)
        if by_step:
            xs = sorted(by_step)
            stats = [mean_std(by_step[x]) for x in xs]
            mean = [m for m, _, _ in stats]
            std = [0.0 if math.isnan(sd) else sd for _, sd, _ in stats]
            ax_ent.plot(xs, mean, color=color, linewidth=1.2, label=f"{objective} (seeds {_seeds(runs)})")
            ax_ent.fill_between(xs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                color=color, alpha=0.2, linewidth=0)
    for who, style in (("base", dict(color="grey", linestyle="--")), ("teacher", dict(color="black", linestyle=":"))):
        found = [100 * getattr(s, who)["pass_at_k"]["1"] for s in summaries if getattr(s, who)]
        if found:
            ax_one.axhline(mean_std(found)[0], label="base student" if who == "base" else who, **style)
    _style_passk(ax_pass, max_k)
    ax_pass.set_title("pass@k, mean ± std over seeds", fontsize=10)
    ax_pass.legend(fontsize=7)
    ax_one.set_xticks(range(len(names)), names, fontsize=8)
    ax_one.set_ylabel("pass@1 (%)")
    ax_one.set_title("final pass@1: each seed (dots), mean ± std (bars)", fontsize=10)
    ax_one.grid(alpha=0.3, axis="y")
    ax_one.legend(fontsize=7)
    ax_ent.set_title("student token entropy during training, mean ± std", fontsize=10)
    ax_ent.set_xlabel("global step")
    ax_ent.set_ylabel("nats")
    ax_ent.grid(alpha=0.3)
    ax_ent.legend(fontsize=7)
    return fig

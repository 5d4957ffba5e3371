"""Quality against NFE: `ucgm eval fid --steps 4,8,16` runs one evaluation per value (or combination of values)
into OUT/<field>-<value>/ (each resumable like a single evaluation), then writes OUT/sweep.csv,
OUT/sweep.json, a table in the terminal and OUT/<metric>-vs-nfe.png per metric, with the recipe's
published numbers (paper_before / paper_after / paper_tuned, FID) marked at their NFE.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

from ... import distributed
from ...console import SILENT, Reporter
from ...foundation import output_folder, resolve_device, write_file_atomic
from .job import LABELS, EvalConfig, run_one

SUMMARY_CSV, SUMMARY_JSON = "sweep.csv", "sweep.json"
SWEEP_OWNED = ("*-*", SUMMARY_CSV, SUMMARY_JSON, "*-vs-nfe.png")


def point_name(values: dict[str, Any]) -> str:
    """The subfolder of one sweep point: steps-8, or steps-8_cfg_scale-1.5 (tuples joined by commas)."""
    def text(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return "_".join(f"{name}-{text(value)}" for name, value in values.items())


def nfe_number(label: str) -> int | None:
    """'40x2' -> 80, '8' -> 8 (the network evaluations per sample), None when not an NFE."""
    head, _, mult = str(label).partition("x")
    return int(head) * (int(mult) if mult.isdigit() else 1) if head.isdigit() else None


def run(config: EvalConfig, reporter: Reporter = SILENT) -> dict[str, Any] | None:
    """One evaluation, or a sweep when a sampling flag lists several values (see the module doc)."""
    if not config.sampling.is_sweep:
        return run_one(config, reporter)
    points = config.sampling.points()
    with distributed.session(str(resolve_device(config.device))) as ctx:
        if ctx.is_main:
            output_folder(config.out, SWEEP_OWNED, "evaluation sweep", overwrite=config.overwrite, resume=True)
            for name in (SUMMARY_CSV, SUMMARY_JSON):
                (config.out / name).unlink(missing_ok=True)  # a partial sweep never leaves a summary
        distributed.barrier(ctx)
        rows = []
        for values, overrides in points:
            sub = config.out / point_name(values)
            reporter.info(f"sweep point {point_name(values)} -> {sub}")
            point = config.model_copy(update={"sampling": type(config.sampling)(**overrides.given()), "out": sub})
            results = run_one(point, reporter)
            if results is not None:
                rows.append(_row(values, sub, results))
        if not ctx.is_main:
            return None
    return _summarize(config.out, rows, reporter)


def _row(values: dict[str, Any], sub: Path, results: dict[str, Any]) -> dict[str, Any]:
    label = results["sampling"]["nfe_per_sample"]
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, "nfe": label,
            "nfe_evaluations": nfe_number(label), **results["metrics"], "folder": sub.name,
            "published": results.get("published", {})}


def _summarize(out: Path, rows: list[dict[str, Any]], reporter: Reporter) -> dict[str, Any]:
    """sweep.csv, sweep.json, the terminal table and one plot per metric."""
    published = rows[0].pop("published") if rows else {}
    for row in rows[1:]:
        row.pop("published")
    columns = list(rows[0]) if rows else []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()}
                     for row in rows)
    write_file_atomic(out / SUMMARY_CSV, buffer.getvalue().encode())
    summary = {"points": rows, "published": published}
    write_file_atomic(out / SUMMARY_JSON, (json.dumps(summary, indent=2) + "\n").encode())
    metrics = [c for c in columns if c in LABELS]
    reporter.grid("Sweep", [LABELS.get(c, c) for c in columns],
                  [[_cell(row[c]) for c in columns] for row in rows])
    plots = [plot_metric(out, rows, name, published) for name in metrics]
    reporter.info(f"wrote {out / SUMMARY_CSV}, {out / SUMMARY_JSON}, {', '.join(p.name for p in plots)}")
    return summary


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)


def plot_metric(out: Path, rows: list[dict[str, Any]], metric: str, published: dict[str, Any]) -> Path:
    """OUT/<metric>-vs-nfe.png: the metric against NFE (one line per setting of the other swept fields)."""
    swept = [k for k in rows[0] if k not in (*LABELS, "nfe", "nfe_evaluations", "folder", "steps")]
    lines: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row[metric] is not None and row["nfe_evaluations"] is not None:
            key = ", ".join(f"{k}={row[k]}" for k in swept) or "UCGM-S"
            lines.setdefault(key, []).append((row["nfe_evaluations"], row[metric]))
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    for key, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ticks = {p[0] for pts in lines.values() for p in pts}
    if metric == "fid":  # recipes publish FID only
        for i, (name, paper) in enumerate(published.items()):
            nfe = nfe_number(paper["nfe"])
            if nfe is not None:
                ticks.add(nfe)
                ax.scatter([nfe], [paper["fid"]], marker="*", s=180, zorder=3, color=f"C{3 + i}",
                           label=f"published ({name.removeprefix('paper_')}): {paper['fid']} at {paper['nfe']} NFE")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("NFE per sample (network evaluations; x2 with CFG)")
    ax.set_ylabel(LABELS[metric])
    ax.set_title(f"{LABELS[metric]} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    path = out / f"{metric}-vs-nfe.png"
    write_file_atomic(path, buffer.getvalue())
    return path

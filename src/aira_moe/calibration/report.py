"""Human-readable allocation report: JSON, a PNG bar chart, and a short logged table."""

from __future__ import annotations

import json
import os
from typing import Optional

# the report's files in a run's output_dir (LlamaBoard shows them, the adapter checks read the JSON)
REPORT_JSON = "aira_moe_allocation.json"
REPORT_PNG = "aira_moe_allocation.png"


def build_report(
    *,
    units: dict[str, list[str]],
    importance: Optional[dict[str, float]],
    unit_ranks: dict[str, int],
    params_per_rank: dict[str, int],
    uniform_r: int,
    config_summary: dict,
    seconds: dict[str, float],
    params_fixed: Optional[dict[str, int]] = None,
) -> dict:
    """Per unit: theta, rank, modules; totals; trainable parameters vs uniform rank ``uniform_r``.
    ``params_per_rank[module]`` = trainable parameters of that module per unit of rank (num_A*in + num_B*out, plus a
    router's share), ``params_fixed[module]`` those that do not depend on the rank (a router's, default none)."""
    fixed = sum((params_fixed or {}).get(m, 0) for ms in units.values() for m in ms)
    rows = []
    for unit, modules in units.items():
        rows.append({
            "unit": unit,
            "theta": None if importance is None else importance[unit],
            "rank": unit_ranks[unit],
            "modules": modules,
        })
    params = fixed + sum(unit_ranks[u] * params_per_rank[m] for u, ms in units.items() for m in ms)
    uniform = fixed + sum(uniform_r * params_per_rank[m] for ms in units.values() for m in ms)
    return {
        "config": config_summary,
        "layers": rows,
        "rank_sum": sum(unit_ranks.values()),
        "num_units": len(units),
        "trainable_params": params,
        "uniform_rank_params": uniform,
        "params_ratio_vs_uniform": params / uniform if uniform else None,
        "seconds": seconds,
    }


def _theta(row: dict) -> str:
    return "-" if row["theta"] is None else f"{row['theta']:.4g}"


def _summary(report: dict) -> str:
    return (f"rank sum {report['rank_sum']} over {report['num_units']} layers; trainable params "
            f"{report['trainable_params']:,} ({report['params_ratio_vs_uniform']:.3f}x uniform r={report['config'].get('r')})")


def format_table(report: dict) -> str:
    lines = [f"{'layer':<32} {'theta':>10} {'rank':>5}"]
    for row in report["layers"]:
        lines.append(f"{row['unit']:<32} {_theta(row):>10} {row['rank']:>5}")
    lines.append(_summary(report))
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The same table as Markdown (LlamaBoard shows it beside the loss plot)."""
    lines = [f"| layer | theta ({report['config'].get('theta_type')}) | rank |", "|---|---:|---:|"]
    lines += [f"| {row['unit']} | {_theta(row)} | {row['rank']} |" for row in report["layers"]]
    return "\n".join(lines) + f"\n\n{_summary(report)}"


def write_report(report: dict, output_dir: str) -> dict[str, str]:
    """Write REPORT_JSON and REPORT_PNG into ``output_dir``; returns their paths. Each file
    is written under a temporary name and renamed, so a reader (LlamaBoard polls while training runs) never sees half
    a file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, REPORT_JSON)
    with open(json_path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    os.replace(json_path + ".tmp", json_path)
    png_path = os.path.join(output_dir, REPORT_PNG)
    rows = report["layers"]
    fig, ax_rank = plt.subplots(figsize=(max(6, 0.3 * len(rows) + 2), 4))
    positions = range(len(rows))
    bars = ax_rank.bar(positions, [row["rank"] for row in rows], color="tab:blue", label="allocated rank")
    ax_rank.bar_label(bars, fontsize=7)  # the rank on each bar
    ax_rank.set_ylim(0, 1.3 * max([row["rank"] for row in rows], default=1))  # headroom for the labels and legend
    ax_rank.set_xlabel("layer")
    ax_rank.set_ylabel("rank")
    ax_rank.set_xticks(list(positions), [row["unit"].rsplit(".", 1)[-1] for row in rows], fontsize=7)
    handles = [bars]
    if rows and rows[0]["theta"] is not None:
        ax_theta = ax_rank.twinx()
        (line,) = ax_theta.plot(list(positions), [row["theta"] for row in rows], color="tab:red", marker="o",
                                label=f"importance theta ({report['config'].get('theta_type')})")
        ax_theta.set_ylabel(f"importance ({report['config'].get('theta_type')})")
        handles.append(line)
    ax_rank.legend(handles=handles, loc="upper left", fontsize=8)
    ax_rank.set_title(f"aira_moe rank allocation (sum {report['rank_sum']}, {report['config'].get('objective_function')})")
    fig.tight_layout()
    fig.savefig(png_path + ".tmp", dpi=100, format="png")
    plt.close(fig)
    os.replace(png_path + ".tmp", png_path)
    return {"json": json_path, "png": png_path}

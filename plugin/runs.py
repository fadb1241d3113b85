"""A run directory's record (`run.json`) and `gradlane runs`: what ran, where, how it ended.

`run.json` holds the MLflow run id and tracking URI, the status the driver
last set (RUNNING, FINISHED, FAILED, KILLED) and whether MLflow has received
everything (`synced`); `metrics.jsonl` holds every metric record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
RUN_POINTER = "gradlane_run_dir.txt"  # in a run's storage directory: where the run directory is
METRICS_FILE = "metrics.jsonl"
KEY_METRICS = ("train/loss", "val/loss")


def read_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def update_info(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into run.json (written whole to a temporary file, then renamed)."""
    info = {**read_info(run_dir), **fields}
    tmp = Path(run_dir) / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, Path(run_dir) / RUN_FILE)
    return info


def storage_dir(run_dir: Path) -> Path:
    """Where Ray Train keeps the run's attempts and checkpoints (`run.storage`/<name>,
    default <run dir>/ray)."""
    return Path(read_info(run_dir).get("storage") or Path(run_dir) / "ray")


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The newest value of every metric in metrics.jsonl, and the newest step."""
    path = Path(run_dir) / METRICS_FILE
    out: dict[str, Any] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                out.update(json.loads(line))
    return out


def list_runs(root: Path) -> list[dict[str, Any]]:
    """One row per run directory directly under `root`, oldest first."""
    from omegaconf import OmegaConf

    rows = []
    root = Path(root)
    dirs = [p for p in root.iterdir() if (p / RUN_FILE).exists()] if root.is_dir() else []
    for run_dir in sorted(dirs, key=lambda p: p.stat().st_mtime):
        info, metrics = read_info(run_dir), last_metrics(run_dir)
        recipe = ""
        if (run_dir / "config.yaml").exists():
            recipe = OmegaConf.load(run_dir / "config.yaml").run.recipe
        rows.append(
            {
                "name": run_dir.name,
                "recipe": recipe,
                "status": info.get("status", "?"),
                "step": metrics.get("step", 0),
                **{k: metrics[k] for k in KEY_METRICS if k in metrics},
                "mlflow run": info.get("run_id") or "",
                "synced": "yes" if info.get("synced", True) else "no",
            }
        )
    return rows


def runs_table(rows: list[dict[str, Any]]) -> str:
    """The rows of `list_runs` as an aligned text table."""
    return text_table(
        ["name", "recipe", "status", "step", *KEY_METRICS, "mlflow run", "synced"], rows
    )


def text_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """`columns` of `rows` as aligned text (floats to 4 significant digits)."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [columns] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in table)
    return "\n".join(line.rstrip() for line in lines)

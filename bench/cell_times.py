#!/usr/bin/env python
"""Where a study's time goes, from the MLflow runs it left (a script, not a test).

    python bench/cell_times.py digits_depth digits_noise          # the project's store (or MLFLOW_TRACKING_URI)
    python bench/cell_times.py digits_depth --ref resnet8          # times relative to the cell named *resnet8*

Per finished (or killed) cell run of each study: wall seconds from start to end, seconds per training epoch (from the
timestamps of the per-epoch ``train/acc`` metric: the median gap between epochs), the measurement's seconds (last epoch's metric to the run's end),
the first epoch whose training accuracy is 1.0 (and >= 0.999), and the time relative to the reference cell. On a
shared machine absolute times are inflated by the load; ratios between cells of one run are the figures to use.
"""
from __future__ import annotations

import argparse

import numpy as np

from pnc import tracking


def cell_rows(experiment: str) -> list[dict]:
    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    rows = []
    for r in c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'cell'", max_results=5000,
                           order_by=["attributes.start_time ASC"]):
        hist = sorted(c.get_metric_history(r.info.run_id, "train/acc"), key=lambda m: m.step)
        ts = [m.timestamp / 1000 for m in hist]
        start, end = r.info.start_time / 1000, (r.info.end_time or 0) / 1000
        gaps = np.diff([start] + ts)  # the first gap holds the data loading and model set-up
        epoch_s = float(np.median(gaps[1:])) if len(gaps) > 1 else float("nan")  # median: a resumed run's gap is left out
        fit = next((m.step + 1 for m in hist if m.value >= 1.0), None)
        near = next((m.step + 1 for m in hist if m.value >= 0.999), None)
        rows.append({"cell": r.data.tags.get(tracking.TAG_CELL_NAME, r.info.run_name), "status": r.info.status,
                     "epochs": len(hist), "wall_s": end - start if end else float("nan"), "epoch_s": epoch_s,
                     "measure_s": end - ts[-1] if end and ts else float("nan"), "fit_epoch": fit, "fit999_epoch": near,
                     "final_train_acc": hist[-1].value if hist else float("nan")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("studies", nargs="+", help="experiment (study) names")
    ap.add_argument("--ref", default=None, help="substring of the reference cell's name (default: the study's first cell)")
    a = ap.parse_args()
    for study in a.studies:
        rows = cell_rows(study)
        if not rows:
            print(f"{study}: no runs")
            continue
        ref = next((r for r in rows if a.ref and a.ref in r["cell"] and r["status"] == "FINISHED"), rows[0])
        print(f"== {study} (reference: {ref['cell']})")
        print(f"{'cell':<58} {'status':<8} {'ep':>3} {'wall s':>7} {'s/epoch':>7} {'meas s':>7} {'fit@':>5} {'.999@':>5} "
              f"{'acc':>6} {'x ref':>6} {'ep x ref':>8}")
        for r in rows:
            print(f"{r['cell'][:58]:<58} {r['status']:<8} {r['epochs']:>3} {r['wall_s']:>7.0f} {r['epoch_s']:>7.2f} "
                  f"{r['measure_s']:>7.1f} {str(r['fit_epoch']):>5} {str(r['fit999_epoch']):>5} {r['final_train_acc']:>6.4f} "
                  f"{r['wall_s'] / ref['wall_s']:>6.2f} {r['epoch_s'] / ref['epoch_s']:>8.2f}")


if __name__ == "__main__":
    main()

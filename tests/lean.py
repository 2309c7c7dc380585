"""Overrides for tests about runs, stores and processes rather than the metric family.

``specs/digits_depth.yaml`` selects all 14 metrics and takes snapshots during training; ``specs/digits_noise.yaml``
takes snapshots. For a one-epoch test cell that doubles the cell's time. These tests measure pnc's default selection
(cdnv, nc1, nc2, ncc, probe) once, at the end of training; the family and the snapshots are checked by
tests/test_metric_registry.py, tests/test_metrics_dist.py, tests/test_snapshots.py and tests/test_e2e.py (which runs
the embedded spec as it ships).
"""
LEAN = ["--set", "measure.metrics=[cdnv, nc1, nc2, ncc, probe]", "--set", "measure.epochs=[]"]

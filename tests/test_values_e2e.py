"""Logged values recomputed from the trained networks, one tiny study per kind.

Each study runs through ``pnc run`` (a subprocess, its own MLflow store). The test then takes the network the run
measured back from what the run left (a measure study's checkpoint file, a transfer study's registered model
version, or, for trained depth and noise cells, the checkpoint pnc writes after the last epoch: kept here by
``PNC_TEST_KEEP_CHECKPOINTS``? no: see ``keep_checkpoints``), hooks the layers named in the run's ``layers.json``,
rebuilds the split the cell used (train/test, the noisy label vector of a noise cell, the clean and corrupted
images of a corrupted-input cell), and recomputes the per-layer metrics with the independent float64 reference
``tests/metrics_reference.py`` (it does not import pnc.metrics). Features are float32, so rel 1e-4.
"""
from __future__ import annotations

import math
import warnings

import pytest


# ----------------------------------------------------------------------------- corrupted-input mem_ratio
def test_corrupted_input_mem_ratio_is_the_shared_function() -> None:
    """A corrupted-input cell's Delta goes through memorization_ratio (docs/metrics.md): clean-input CDNV over
    corrupted-input CDNV, Python floats, and a zero denominator warns (MetricWarning naming the layer) instead of
    numpy's silent inf / NaN."""
    from pnc.kinds.noise import corrupted_input_results
    from pnc.metrics.registry import MetricWarning

    corrupted = {"cdnv/train": [0.0, 0.0, 2.0], "nc2/train": [0.1, 0.2, 0.3], "probe_acc/test": [0.5, 0.5, 0.5]}
    clean = {"cdnv/train": [0.0, 1.0, 1.0], "nc2/train": [0.4, 0.5, 0.6], "probe_acc/test": [0.7, 0.8, 0.9]}
    with pytest.warns(MetricWarning, match=r"CDNV on corrupted inputs is 0 \(layer 0\)"):
        out = corrupted_input_results(corrupted, clean)
    assert math.isnan(out["mem_ratio/train"][0]) and out["mem_ratio/train"][1:] == [math.inf, 0.5]
    assert all(type(v) is float for v in out["mem_ratio/train"])
    assert out["cdnv/train_noisy"] == corrupted["cdnv/train"] and out["cdnv/train_clean"] == clean["cdnv/train"]
    assert out["nc2/train_noisy"] == corrupted["nc2/train"] and out["probe_acc/test"] == clean["probe_acc/test"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zero: no warning of any kind
        assert corrupted_input_results({"cdnv/train": [4.0]}, {"cdnv/train": [1.0]})["mem_ratio/train"] == [0.25]

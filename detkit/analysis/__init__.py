"""Analyses behind ``tools/analyze.py``, one module per thing analyzed.

* :mod:`.model`: parameters and FLOPs of a detector per image, with a per-module breakdown.
* :mod:`.dataset`: images, instances per class, box sizes / aspect ratios, image sizes of a split.
* :mod:`.log`: loss and AP curves of a run's ``metrics.jsonl`` (and ``metrics.json``).
* :mod:`.common`: the detection-config loader, the plain-text table and the matplotlib helpers
  shared by the three.

The submodules are imported on demand (``from detkit.analysis.log import analyze_log``) so a log
analysis does not build models.
"""

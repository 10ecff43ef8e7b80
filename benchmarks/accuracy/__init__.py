"""Accuracy study (issue 6): dense vs SR-STE vs STE vs fixed-mask fine-tuning at CPU scale.

``run.py`` trains the grid and writes ``benchmarks/results/accuracy.json``; ``render.py``
reads that JSON and writes the Markdown table and PNG plots under ``docs/accuracy/``.
``data.py`` builds the two offline data sets, ``tasks.py`` holds one frozen setting per
task, ``train.py`` trains one (task, method, pattern, seed) run.
"""

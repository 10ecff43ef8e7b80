"""Accuracy study (issue 6): dense vs SR-STE vs STE vs fixed-mask fine-tuning at CPU scale.

``run.py`` trains the grid and writes ``out/benchmarks/accuracy.json`` (the committed result is
``benchmarks/results/accuracy.json``, replaced only with ``--out``); ``render.py``
reads that JSON and writes the Markdown table and PNG plots under ``out/accuracy/`` (the
committed ones under ``docs/accuracy/``, with ``--out docs/accuracy``).
``data.py`` builds the two offline data sets, ``tasks.py`` holds one frozen setting per
task, ``train.py`` trains one (task, method, pattern, seed) run.
"""

"""The one-shot pruning study (issue 16): ``run.py`` trains, prunes and fine-tunes;
``render.py`` writes ``docs/oneshot.md``'s tables and plot; ``sparsegpt_layer.py`` times
SparseGPT on one 4096x4096 layer."""

"""fastseq's benchmark suite: ``fastseq bench`` (:mod:`fastseq.bench.run`).

This folder (``bench/`` in the checkout) is installed as the package
``fastseq.bench``, so the command works from an installed fastseq as from the
checkout. :mod:`.core` (records, context, timing), :mod:`.roofline` (ceilings,
floors), :mod:`.report` (JSON, Markdown, plot), :mod:`.suites` (one module per
suite), :mod:`.baselines` (optional third-party baselines). Results of runs are
committed under ``bench/results/``, performance notes in ``bench/NOTES.md``.
"""

"""Publishing a study from its storage, without training.

:func:`results.read_results` reads the storage once into a :class:`results.Results`; every output is
a function of it: :mod:`rank` (the board and the trials table), :mod:`provenance` (with
:mod:`agreement`), :mod:`leaderboard` (the CSV, JSON and :mod:`markdown` files), :mod:`plots` and
:mod:`html` (``index.html``), :mod:`bundle` (the re-run bundle) and :mod:`index`
(``results/README.md``). :mod:`format` holds the cell formatting they share.
"""

"""harness-example-plugin: the worked example of a third-party plugin for the transfer harness.

Everything the harness needs is in :mod:`harness_example.plugin`, which the distribution
declares in the ``harness`` entry-point group (see this package's ``pyproject.toml``). Keep this
``__init__`` light: the harness imports the plugin module when it starts, for every command.
"""

__version__ = "0.1.0"

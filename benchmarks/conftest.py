"""Performance benchmarks (pytest-benchmark). Run: .venv/bin/python -m pytest benchmarks -p no:cacheprovider

Every benchmark reports a ratio measured in the same run against a plain PyTorch loop on the same
work: absolute times on a shared machine are noise.
"""

import os

os.environ.setdefault("HARNESS_PLUGINS", "timm,heads,strategies,datasets")

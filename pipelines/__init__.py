"""Pipeline stages (scan, extract, fit-heads, ...) and the command-line interface.

Each stage is a ``<Verb>Config`` dataclass plus a ``run_<verb>(config)`` function
that Python users call directly; the CLI is a thin layer over them.
"""

import os as _os

# Fewer TensorFlow C++ notices on every backbone build (the CPU-feature one;
# TF 2.21 prints its oneDNN notice before it reads this variable). Errors still
# show, and a user who sets the variable keeps their value.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

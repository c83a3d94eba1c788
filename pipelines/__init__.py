"""Pipeline stages (scan, extract, fit-heads, ...) and the command-line interface.

Each stage is a ``<Verb>Config`` dataclass plus a ``run_<verb>(config)`` function
that Python users call directly; the CLI is a thin layer over them.
"""

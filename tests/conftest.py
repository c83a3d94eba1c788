"""The suite runs the ``keras`` runtime unless a test asks for another: on CPU the default
would be ``openvino``, which converts each recipe once per store (about 20 s at 32 px),
and the tests of the openvino runtime (tests/test_runtimes.py) choose it explicitly."""

import os

from pipelines.extract.runtimes import RUNTIME_ENV

os.environ.setdefault(RUNTIME_ENV, "keras")

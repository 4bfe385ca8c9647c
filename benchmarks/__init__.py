"""kithara-ops benchmarks: ratios measured in one run, with interleaved repetitions."""

import kithara_ops  # noqa: F401  (selects Keras' JAX backend before any benchmark imports keras)

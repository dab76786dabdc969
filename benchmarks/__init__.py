"""fxlrd's benchmarks: the speed suite (``python -m benchmarks``, see `benchmarks.__main__`) and
the accuracy scripts beside it."""

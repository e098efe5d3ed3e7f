"""The benchmark scripts (importable, for `weir bench` and the tests); each also runs as a script."""

"""Benchmarks whose logic ships with the package (``qkv bench``); ``benchmarks/`` holds thin scripts at most."""

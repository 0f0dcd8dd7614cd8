"""Attention peak memory and time vs sequence length, explicit vs fused (same as `qkv bench attention`)."""

import sys

from qkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", *sys.argv[1:]]))

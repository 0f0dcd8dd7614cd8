"""Training tokens/s and MFU: qkv vs Hugging Face GPT-2 vs x-transformers (same as `qkv bench training`)."""

import sys

from qkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "training", *sys.argv[1:]]))

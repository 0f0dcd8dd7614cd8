"""Generation speed: qkv vs Hugging Face on the same weights, the weight-reading limit, the KV cache.

    python benchmarks/bench_generate.py [--quick] [--threads N] [--repeats 5] [--only small|gpt2|cache]

The same as ``qkv bench generate``; the logic lives in ``qkv.bench.generation``.
"""

import sys

from qkv.bench.generation import main

if __name__ == "__main__":
    sys.exit(main())

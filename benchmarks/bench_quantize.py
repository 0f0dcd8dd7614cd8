"""SmolLM2-135M quantized (int8, int4 from its Q4_1 blocks): perplexity on held-out text, greedy agreement with the
bf16 reference (itself the dequantized Q4_1 file), bytes and tokens/s.

    python benchmarks/bench_quantize.py [--tokens 2048] [--new-tokens 64] [--threads 1]

The logic lives in ``qkv.bench.quantization``; the results are in docs/results/quantize.md.
"""

import sys

from qkv.bench.quantization import main

if __name__ == "__main__":
    sys.exit(main())

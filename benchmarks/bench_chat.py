"""Time to first token at turn 5 of a chat, with the conversation's KV cache reused and without.

    python benchmarks/bench_chat.py [--checkpoint PATH] [--threads N] [--repeats 3]

The logic lives in ``qkv.bench.chat``; the default model is SmolLM2-135M-Instruct from the bundled GGUF.
"""

import sys

from qkv.bench.chat import main

if __name__ == "__main__":
    sys.exit(main())

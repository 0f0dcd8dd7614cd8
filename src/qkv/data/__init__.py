"""The data layer: text → token ids → batches, for every recipe.

- :mod:`qkv.data.text`: text corpora (the bundled tiny Shakespeare, a file, a folder), cached token files and
  seeded random windows (language models);
- :mod:`qkv.data.parallel`: parallel corpora, the split by source sentence, length-bucketed token batches and
  synthetic-task batches (encoder-decoders);
- :mod:`qkv.data.padding`: padding token-id lists into a batch with its attention mask;
- :mod:`qkv.data.chat`: chat JSONL conversations rendered with the model's template, the assistant replies as
  targets, batches by length (fine-tuning).

The bundled text files (``tinyshakespeare.txt``) sit beside these modules as package data.
"""

from . import chat, padding, parallel, text
from .chat import *  # noqa: F403
from .padding import *  # noqa: F403  (the package's names are its modules' names)
from .parallel import *  # noqa: F403
from .text import *  # noqa: F403
from .text import TEXT_SUFFIXES  # noqa: F401  (public before qkv.data became a package)

__all__ = [*text.__all__, *padding.__all__, *parallel.__all__, *chat.__all__]

"""``qkv.generate``: the names generation has always been imported by, now living in :mod:`qkv.generation`
(config, logits, stopping, sampling, beam, text) and, for padding, :mod:`qkv.data`.

``from qkv.generate import GenerationConfig, generate, stream, beam_search, generate_text, stream_text, left_pad``
keeps working; new code imports from :mod:`qkv.generation`.
"""

from .generation import *  # noqa: F403  (re-export: the names and the list are qkv.generation's)
from .generation import __all__  # noqa: F401

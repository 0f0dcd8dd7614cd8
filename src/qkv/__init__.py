"""qkv: the Transformer as the classic explanations describe it — every formula as code, every head a picture."""

from .attention import KVCache, MultiHeadAttention, scaled_dot_product_attention
from .config import ModelConfig
from .loading import load
from .models import DecoderLM, Encoder, Transformer, build_model
from .quantize import quantize  # the function: its module's classes import as `from qkv.quantize import ...`

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "MultiHeadAttention",
    "KVCache",
    "scaled_dot_product_attention",
    "Encoder",
    "DecoderLM",
    "Transformer",
    "build_model",
    "load",
    "quantize",
    "__version__",
]

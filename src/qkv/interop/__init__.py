"""Weights and tokenizers in and out of other formats (Hugging Face GPT-2 and BERT)."""

"""vlmtune: fine-tune vision-language models."""

__version__ = "0.1.0"

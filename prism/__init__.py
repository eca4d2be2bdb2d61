"""Prism: serve many LLMs on few GPUs with elastic, ballooned GPU memory."""

__version__ = "0.1.0"

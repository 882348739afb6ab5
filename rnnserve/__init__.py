"""rnnserve: an inference server for recurrent language models."""

__version__ = "0.1.0"

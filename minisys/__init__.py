"""minisys: a pure-PyTorch LLM serving system built to be taught."""
__version__ = "0.1.0"

"""minisys: a pure-PyTorch LLM serving system built to be taught."""
__version__ = "0.1.0"

from .engine.outputs import CompletionOutput, RequestOutput
from .engine.sampling_params import SamplingParams
from .llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

"""Request handling: sampling parameters, the sampler, stopping, detokenization, the eager baseline."""
from .eager import EagerGenerator
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["EagerGenerator", "CompletionOutput", "RequestOutput", "SamplingParams"]

"""The model: config, layers, the Llama decoder, weight loaders, tokenizer."""
from .config import ModelConfig
from .llama import LlamaModel
from .loader import load
from .tokenizer import Tokenizer

__all__ = ["ModelConfig", "LlamaModel", "Tokenizer", "load"]

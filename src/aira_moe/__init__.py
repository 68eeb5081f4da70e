"""aira-moe: CoLA collaborative adapters + activation-aware techniques, as a peft method and a LLaMA-Factory plugin.

Importing this package registers ``AiraMoeConfig`` with peft, so ``get_peft_model`` and
``PeftModel.from_pretrained`` work with AiraMoe adapters.
"""

from .tuner import AiraMoeConfig, AiraMoeLayer, AiraMoeModel

__version__ = "0.1.0"
__all__ = ["AiraMoeConfig", "AiraMoeLayer", "AiraMoeModel", "__version__"]

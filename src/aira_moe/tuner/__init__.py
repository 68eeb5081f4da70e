"""The AiraMoe peft tuner (config / layer / model, as peft's tuners/lora)."""

from peft.utils import register_peft_method

from ._registry import ensure_peft_type
from .config import AiraMoeConfig
from .layer import AiraMoeLayer, Linear
from .model import AiraMoeModel

PEFT_METHOD_NAME = "aira_moe"


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = ensure_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is AiraMoeModel:
        return  # already registered (idempotent)
    register_peft_method(name=PEFT_METHOD_NAME, config_cls=AiraMoeConfig, model_cls=AiraMoeModel, prefix=AiraMoeModel.prefix)


_register()

__all__ = ["AiraMoeConfig", "AiraMoeLayer", "AiraMoeModel", "Linear"]

"""aira-moe: CoLA collaborative adapters + activation-aware techniques, as a peft method and a LLaMA-Factory plugin.

Importing this package makes ``AiraMoeConfig`` known to peft, so ``get_peft_model`` and
``PeftModel.from_pretrained`` work with AiraMoe adapters: at once when peft is already imported, otherwise when peft
is (the package itself stays light: ``aira-moe --help`` must not pay for torch / transformers / scipy).
"""

import sys

__version__ = "0.1.0"
__all__ = ["AiraMoeConfig", "AiraMoeLayer", "AiraMoeModel", "__version__"]
_TUNER_NAMES = ("AiraMoeConfig", "AiraMoeLayer", "AiraMoeModel")


def __getattr__(name: str):
    if name in _TUNER_NAMES:
        from . import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module 'aira_moe' has no attribute {name!r}")


if "peft" in sys.modules:
    from . import tuner  # noqa: F401  (registers now; on an unsupported peft this raises, naming the versions)
else:
    import aira_moe_startup

    aira_moe_startup.watch("peft")  # registers when peft is imported, even with the start-up hook disabled

"""Start-up hook of aira-moe, imported from ``aira_moe_startup.pth`` at interpreter start.

It must stay cheap (no torch import): it only arms an import watcher. When ``peft`` finishes importing, the AiraMoe
method is registered with it (so ``PeftModel.from_pretrained`` works in any program, e.g. lm-evaluation-harness);
when ``llamafactory`` finishes importing, ``finetuning_type: aira_moe`` is installed into it. torchrun workers start
in ``llamafactory/launcher.py``, not the CLI, so this is the one place every process passes through.
Set ``AIRA_MOE_DISABLE_STARTUP=1`` to turn it off.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_ON_IMPORT = {
    "peft": ("aira_moe.tuner", None),
    "llamafactory": ("aira_moe.integrations.llamafactory", "install"),
}


class _AfterImport(importlib.abc.Loader):
    def __init__(self, loader, fullname):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        target, function = _ON_IMPORT[self._fullname]
        imported = importlib.import_module(target)
        if function:
            getattr(imported, function)()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _Watcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _ON_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _AfterImport(spec.loader, fullname)
        return spec


def arm() -> None:
    if os.environ.get("AIRA_MOE_DISABLE_STARTUP") == "1":
        return
    if any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _Watcher())


arm()

"""Start-up hook of aira-moe, imported from ``aira_moe_startup.pth`` at interpreter start.

It must stay cheap (no torch import): it only arms an import watcher. When ``peft`` finishes importing, the AiraMoe
method is registered with it (so ``PeftModel.from_pretrained`` works in any program, e.g. lm-evaluation-harness);
when ``llamafactory`` finishes importing, ``finetuning_type: aira_moe`` is installed into it; when its web UI
(LlamaBoard, ``llamafactory.webui.interface``) finishes importing, the UI gets aira_moe too (only that process pays
for it). torchrun workers start in ``llamafactory/launcher.py``, not the CLI, so this is the one place every process
passes through.
Set ``AIRA_MOE_DISABLE_STARTUP=1`` to turn it off.

Failures stay local: on a peft or LLaMA-Factory version outside ``SUPPORTED`` the hook registers nothing (one
warning), so every other use of that library works as before; only aira_moe fails (``import aira_moe`` names the
versions, and LLaMA-Factory refuses ``finetuning_type: aira_moe`` at argument parsing, naming them too).
``SUPPORTED`` is the one table of tested versions; the package reads it from here (no torch import needed).
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys

# [lowest, highest) tested release of each library the hook patches
SUPPORTED = {"peft": ("0.18.0", "0.22.0"), "llamafactory": ("0.9.5", "0.9.6")}


def _release(version: str) -> tuple:
    """'0.18.1.dev0' -> (0, 18, 1): the leading numeric release parts."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else (0,)


def unsupported(library: str, version: str):
    """A sentence naming the installed and the supported versions when ``version`` is outside SUPPORTED, else None."""
    low, high = SUPPORTED[library]
    if _release(low) <= _release(version) < _release(high):
        return None
    return f"aira_moe supports {library} >= {low}, < {high}; the installed {library} is {version}"


_ON_IMPORT = {
    "peft": ("aira_moe.tuner", None),
    "llamafactory": ("aira_moe.integrations.llamafactory", "install"),
    "llamafactory.webui.interface": ("aira_moe.integrations.llamaboard", "install"),
}


class _AfterImport(importlib.abc.Loader):
    def __init__(self, loader, fullname):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        library = self._fullname.split(".")[0]  # a submodule is checked against its library's version
        problem = unsupported(library, getattr(sys.modules[library], "__version__", "0"))
        if problem is not None:  # never break the library's other users: register nothing, guard aira_moe only
            if self._fullname != library:
                return  # warned (and guarded) when the library itself was imported
            import warnings

            warnings.warn(f"{problem}; aira_moe is not registered in this environment.", stacklevel=2)
            if self._fullname == "llamafactory":
                _guard_llamafactory(problem)
            return
        target, function = _ON_IMPORT[self._fullname]
        imported = importlib.import_module(target)
        if function:
            getattr(imported, function)()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


def _asks_for_aira_moe(args) -> bool:
    if isinstance(args, dict):
        return str(args.get("finetuning_type", "")).strip().lower() == "aira_moe"
    items = list(args or [])
    for index, item in enumerate(items):
        if item == "--finetuning_type" and index + 1 < len(items) and items[index + 1] == "aira_moe":
            return True
        if item == "--finetuning_type=aira_moe":
            return True
    return False


def _guard_llamafactory(problem: str) -> None:
    """On an unsupported LLaMA-Factory: wrap only its argument parsing, so that aira_moe (and nothing else) fails there,
    naming the versions; every other finetuning_type parses exactly as without aira-moe."""
    if importlib.util.find_spec("llamafactory.hparams.parser") is None:
        return
    parser = importlib.import_module("llamafactory.hparams.parser")
    original = getattr(parser, "_parse_args", None)
    if original is None or getattr(original, "__aira_moe_guard__", False):
        return

    def parse(hf_parser, args=None, allow_extra_keys=False):
        if _asks_for_aira_moe(args):
            raise ValueError(f"`finetuning_type: aira_moe`: {problem}. Install a supported version.")
        return original(hf_parser, args, allow_extra_keys)

    parse.__aira_moe_guard__ = True
    parser._parse_args = parse


class _Watcher(importlib.abc.MetaPathFinder):
    def __init__(self, names=tuple(_ON_IMPORT)):
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _AfterImport(spec.loader, fullname)
        return spec


def watch(*names: str) -> None:
    """Arm the watcher for ``names`` (all of ``_ON_IMPORT`` by default) unless a watcher already covers them."""
    names = names or tuple(_ON_IMPORT)
    if any(isinstance(finder, _Watcher) and set(names) <= set(finder.names) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _Watcher(names))


def arm() -> None:
    if os.environ.get("AIRA_MOE_DISABLE_STARTUP") == "1":
        return
    watch()


arm()

"""Start-up cost: the .pth hook and ``import aira_moe`` load nothing heavy until aira_moe is used."""

import os
import subprocess
import sys
import textwrap

HEAVY = ("scipy", "matplotlib", "llamafactory", "deepspeed", "bitsandbytes")


def modules_after(code: str, disable_hook: bool) -> set:
    env = {k: v for k, v in os.environ.items() if k != "AIRA_MOE_DISABLE_STARTUP"}
    if disable_hook:
        env["AIRA_MOE_DISABLE_STARTUP"] = "1"
    script = code + "\nimport sys\nprint('\\n'.join(sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return set(result.stdout.split())


def test_the_hook_adds_only_aira_moe_modules_to_import_peft():
    """transformers itself imports scipy when it is installed; the hook must add nothing beyond its own modules."""
    added = modules_after("import peft", disable_hook=False) - modules_after("import peft", disable_hook=True)
    assert added and all(name.split(".")[0] in ("aira_moe", "aira_moe_startup") for name in added), sorted(added)


def test_import_aira_moe_and_the_cli_load_no_torch_and_no_scientific_stack():
    loaded = modules_after("import aira_moe, aira_moe.cli", disable_hook=False)
    assert not {name.split(".")[0] for name in loaded} & {"torch", "transformers", "peft", "numpy", *HEAVY}


def test_calibration_math_imports_scipy_only_when_allocating():
    code = textwrap.dedent(
        """
        import sys
        from aira_moe.calibration import allocation  # torch and numpy only: no transformers, which loads scipy itself
        assert not any(name.split('.')[0] in ('scipy', 'matplotlib', 'transformers') for name in sys.modules)
        assert allocation.allocate_ranks([1.0, 2.0], 4, 1, 3, 'linear') == [1, 3]
        """
    )
    loaded = modules_after(code, disable_hook=True)
    assert "scipy.optimize" in loaded and "matplotlib" not in loaded


def test_import_aira_moe_registers_with_peft_imported_later_even_without_the_hook():
    loaded = modules_after("import aira_moe\nimport peft\nfrom peft.utils.peft_types import PeftType\n"
                           "assert 'AIRA_MOE' in PeftType.__members__", disable_hook=True)
    assert "aira_moe.tuner" in loaded

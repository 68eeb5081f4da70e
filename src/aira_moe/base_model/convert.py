"""GGUF -> a standard Hugging Face folder (safetensors, config, tokenizer with its chat template), written atomically.

transformers' GGUF loader dequantises the tensors (and undoes llama.cpp's q/k row permutation); this module checks the
architecture first, sets the tokenizer's special tokens from the GGUF's own ids (the loader takes the wrong eos for
SmolLM2: <|im_start|> instead of <|im_end|>), and writes into a temporary sibling that is renamed into place only when
complete, so an interrupted or failed conversion leaves nothing in ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

from ..errors import ExistingOutputError, MissingFileError, UserError

SUPPORTED_ARCHITECTURES = ("llama",)
PROVENANCE_FILE = "aira_moe_base.json"


@dataclass
class ConvertedModel:
    path: str
    template: str | None  # LLaMA-Factory template, when known
    provenance: dict = field(default_factory=dict)
    cached: bool = False

    def summary(self) -> str:
        info = self.provenance
        return (f"{info['model_class']}, {info['num_layers']} layers, {info['parameters'] / 1e6:.1f} M parameters "
                f"({info['dtype']}, dequantised from {', '.join(f'{n} {k}' for k, n in info['tensor_types'].items())})")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reader(path: str):
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise MissingFileError(f"--gguf: no file {path}")
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as error:  # gguf's own check of the magic number / layout
        raise UserError(f"--gguf: {path} is not a readable GGUF file ({error})") from error


def _field(reader, key: str):
    found = reader.fields.get(key)
    return None if found is None else found.contents()


def gguf_architecture(path: str) -> str:
    """``general.architecture`` of a GGUF file (read from its header; the tensors are memory-mapped, not loaded)."""
    return str(_field(_reader(path), "general.architecture"))


def read_header(path: str) -> dict:
    """What the conversion needs to know before loading: architecture, special-token ids, tensor types."""
    reader = _reader(path)
    architecture = _field(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"--gguf: {os.path.basename(path)} is a {architecture!r} model; aira-moe base converts "
                        f"{' / '.join(SUPPORTED_ARCHITECTURES)} (Llama-architecture) GGUF files only")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    special = {}
    for role in ("bos", "eos", "padding", "unknown"):
        index = _field(reader, f"tokenizer.ggml.{role}_token_id")
        if index is not None and tokens is not None:
            special[role] = str(tokens.contents(int(index)))
    return {
        "architecture": architecture,
        "name": _field(reader, "general.name"),
        "special_tokens": special,
        "tensor_types": dict(Counter(tensor.tensor_type.name for tensor in reader.tensors)),
    }


def _prepare_out_dir(out_dir: str, gguf_sha256: str) -> "ConvertedModel | None":
    """The finished conversion of the same file in ``out_dir`` (then reused), None for an absent or empty directory;
    anything else there is refused, never overwritten."""
    marker = os.path.join(out_dir, PROVENANCE_FILE)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            provenance = json.load(handle)
        if provenance.get("gguf_sha256") == gguf_sha256:
            return ConvertedModel(out_dir, provenance.get("template"), provenance, cached=True)
        raise ExistingOutputError(f"--out {out_dir} holds a conversion of another GGUF ({provenance.get('source')}); "
                        "choose another --out or remove that directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExistingOutputError(f"--out {out_dir} exists and is not empty; choose another --out or remove it")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file; choose a directory")
    return None


def convert_gguf(gguf_path: str, out_dir: str, *, source: str, template: str | None = None,
                 gguf_sha256: str | None = None) -> ConvertedModel:
    """Dequantise ``gguf_path`` into a Hugging Face folder ``out_dir`` (float32: every dequantised value is exact).
    A finished conversion of the same file there is reused; ``source`` says where the file came from (kept in
    ``aira_moe_base.json`` beside the weights, with the file's sha256 and what was converted)."""
    header = read_header(gguf_path)  # user errors (no file, not a GGUF, another architecture) before any loading
    out_dir = os.path.abspath(out_dir)
    gguf_sha256 = gguf_sha256 or file_sha256(gguf_path)
    reused = _prepare_out_dir(out_dir, gguf_sha256)
    if reused is not None:
        return reused
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    special = header["special_tokens"]
    for role, attribute in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token")):
        if role in special:
            setattr(tokenizer, attribute, special[role])
    tokenizer.pad_token = special.get("padding", tokenizer.eos_token)  # batching needs one; the GGUF's, else eos
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    provenance = {
        "source": source,
        "gguf_file": name,
        "gguf_sha256": gguf_sha256,
        "architecture": header["architecture"],
        "model_name": header["name"],
        "model_class": type(model).__name__,
        "num_layers": model.config.num_hidden_layers,
        "parameters": model.num_parameters(),
        "tensor_types": header["tensor_types"],
        "dtype": "float32",
        "special_tokens": {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token},
        "template": template,
        "converted": time.strftime("%Y-%m-%d %H:%M:%S"),
        "transformers": transformers.__version__,
    }
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, PROVENANCE_FILE), "w", encoding="utf-8") as handle:
            json.dump(provenance, handle, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; a model folder is not
        if os.path.isdir(out_dir):  # empty (checked above)
            os.rmdir(out_dir)
        os.rename(staging, out_dir)
    finally:  # cleanup only: the error (disk full, interrupt) still propagates
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return ConvertedModel(out_dir, template, provenance)

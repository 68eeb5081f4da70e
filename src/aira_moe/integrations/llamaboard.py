"""``finetuning_type: aira_moe`` in LlamaBoard (``llamafactory-cli webui``) -- the only module that imports gradio.

``install()`` runs once, right after ``llamafactory.webui.interface`` is imported (armed by the aira_moe_startup.pth
hook, so only the web UI process pays for it), and only on a supported LLaMA-Factory. It patches, in place and by name:

* ``extras.constants.METHODS`` / ``PEFT_METHODS``: the method dropdown offers aira_moe, and every place LlamaBoard
  treats adapter methods specially (checkpoint listing, chat / eval / export loading adapters, quantization, the
  reward model type) treats aira_moe as one;
* ``webui.interface.create_train_tab``: an AIRA-MoE panel after the LoRA panel, shown for aira_moe, with every aira_moe
  key generated from AiraMoeArguments (type, default, choices, help), and the allocation (``aira_moe_allocation.png``
  and the per-layer table) beside the loss plot once calibration has written it;
* ``webui.runner.Runner._parse_train_args``: the panel's keys and LoRA's shared keys (from the LoRA panel) go into the
  training arguments, so preview, save / load and launch carry them;
* ``webui.runner.Runner._initialize``: the arguments are checked as ``aira-moe check`` checks them, and a bad value is
  LlamaBoard's alert with the same one line, before any process starts;
* ``webui.common._clean_cmd``: keeps aira_moe keys set to False (LlamaBoard drops False values from the command);
* ``webui.interface.create_export_tab``: an ``export-lora`` button beside Export (Export itself merges).
Anything missing raises naming the LLaMA-Factory version; there is no fallback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

import gradio as gr
import yaml

from aira_moe_startup import unsupported

from ..calibration.report import REPORT_JSON, REPORT_PNG
from ..errors import UserError, one_line
from ..tuner.config import AiraMoeConfig
from .arguments import METHOD_KEYS, AiraMoeArguments
from .llamaboard_locales import DEFAULT_TEXT, FIXED, GROUP_TITLES, ZH_HELP, message, translated
from .llamafactory import FINETUNING_TYPE
from .patching import missing, replace
from .preflight import CompletedRunError

NOTE = "aira_moe_note"  # the panel's first line: which keys come from the LoRA panel


@dataclass(frozen=True)
class PanelKey:
    """One aira_moe YAML key as the panel shows it; everything but the Chinese help comes from the argument class."""

    name: str
    kind: Literal["bool", "choice", "int", "float", "yaml"]
    default: Any
    choices: tuple
    help: str


def _panel_key(item: dataclasses.Field, help_text: str) -> PanelKey:
    annotation = item.type
    if typing.get_origin(annotation) is Literal:
        return PanelKey(item.name, "choice", item.default, typing.get_args(annotation), help_text)
    # int or 'auto' and the like were made str for the parser: the text is read as the same text in a YAML recipe
    kind = {bool: "bool", int: "int", float: "float"}.get(annotation, "yaml")
    return PanelKey(item.name, kind, item.default, (), help_text)


@functools.cache
def panel_groups() -> tuple[tuple[Optional[str], tuple[PanelKey, ...]], ...]:
    """The aira_moe keys in METHOD_KEYS order, split into groups: the keys before the first ``use_*`` switch
    (collaboration), then each switch with the keys after it (layer-wise ranks, AwSVD, weighting). A key added to
    METHOD_KEYS appears here with no other change."""
    config_help = {item.name: item.metadata["help"].strip() for item in dataclasses.fields(AiraMoeConfig)}
    fields = {item.name: item for item in dataclasses.fields(AiraMoeArguments)}
    groups: list[tuple[Optional[str], list[PanelKey]]] = [(None, [])]
    for name in METHOD_KEYS:
        if name.startswith("use_"):
            groups.append((name, []))
        groups[-1][1].append(_panel_key(fields[name], config_help[name]))
    return tuple((switch, tuple(keys)) for switch, keys in groups if keys)


def panel_keys() -> tuple[PanelKey, ...]:
    return tuple(key for _, keys in panel_groups() for key in keys)


def _group_element(switch: Optional[str]) -> str:
    return f"aira_moe_group_{switch or 'collaboration'}"


def panel_locales(languages) -> dict[str, dict]:
    """LOCALES entries of the panel: every key labelled by its YAML name, its help (Chinese where translated, English
    otherwise) and default in the info line; group titles; the fixed texts."""
    entries = {name: {lang: texts.get(lang, texts["en"]) for lang in languages} for name, texts in FIXED.items()}
    for switch, _ in panel_groups():
        titles = GROUP_TITLES.get(switch, {"en": switch})
        entries[_group_element(switch)] = {lang: {"value": f"**{translated(titles, lang)}**"} for lang in languages}
    for key in panel_keys():
        entries[key.name] = {}
        for lang in languages:
            help_text = ZH_HELP.get(key.name, key.help) if lang == "zh" else key.help
            info = f"{help_text} {translated(DEFAULT_TEXT, lang, default=key.default)}"
            entries[key.name][lang] = {"label": key.name, "info": info}
    return entries


def _widget(key: PanelKey):
    elem_id = f"aira_moe-{key.name}"
    if key.kind == "bool":  # the label sits beside the box: room for the longest switch name
        return gr.Checkbox(value=key.default, elem_id=elem_id, min_width=220)
    if key.kind == "choice":
        return gr.Dropdown(choices=list(key.choices), value=key.default, elem_id=elem_id)
    if key.kind in ("int", "float"):
        return gr.Number(value=key.default, precision=0 if key.kind == "int" else None, elem_id=elem_id)
    return gr.Textbox(value=str(key.default), elem_id=elem_id)


def argument_value(key: PanelKey, value):
    """The training-argument value of a panel field; an emptied field is an error, not a silent default."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"`{key.name}` is empty; set a value (default {key.default!r}).")
    if key.kind != "yaml":
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise UserError(f"`{key.name}`={value!r} is not a single value.") from None


def training_arguments(get) -> dict:
    """aira_moe's training arguments from the panels: LoRA's shared keys from the LoRA panel, the rest from ours.
    ``get(elem_id)`` reads a component's value."""
    args = {
        "lora_rank": get("train.lora_rank"),
        "lora_alpha": get("train.lora_alpha"),
        "lora_dropout": get("train.lora_dropout"),
        "lora_target": get("train.lora_target") or "all",
        "additional_target": get("train.additional_target") or None,
        "use_rslora": get("train.use_rslora"),
        "create_new_adapter": get("train.create_new_adapter"),
        "use_dora": get("train.use_dora"),
        # LoRA-only options pass through so that the check names them when they are set (aira_moe refuses them)
        "pissa_init": get("train.use_pissa"),
        "loraplus_lr_ratio": get("train.loraplus_lr_ratio") or None,
    }
    for key in panel_keys():
        args[key.name] = argument_value(key, get(f"train.{key.name}"))
    return args


def _patched_parse_train_args(original):
    @functools.wraps(original)
    def parse_train_args(self, data):
        args = original(self, data)
        if args.get("finetuning_type") != FINETUNING_TYPE:
            return args
        args.update(training_arguments(lambda elem_id: data[self.manager.get_elem_by_id(elem_id)]))
        if args["stage"] == "ppo":
            args["reward_model_type"] = "lora"  # the reward model is an adapter, as LlamaBoard sets for lora
        return args

    return parse_train_args


def check_message(args: dict, lang: str) -> str:
    """'' when ``llamafactory-cli train`` would accept ``args``, else the one line ``aira-moe check`` prints."""
    from .llamafactory import check_train_config

    try:
        check_train_config(args, refuse_complete_run=True)
    except CompletedRunError:  # the seam would train nothing and exit 0: say so before starting a process
        return message("complete_run", lang, output_dir=args["output_dir"])
    except UserError as error:
        return one_line(error)
    return ""


def _patched_initialize(original):
    @functools.wraps(original)
    def initialize(self, data, do_train, from_preview):
        error = original(self, data, do_train, from_preview)
        if error or not do_train or data[self.manager.get_elem_by_id("top.finetuning_type")] != FINETUNING_TYPE:
            return error
        try:
            args = self._parse_train_args(data)
        except UserError as bad_field:
            return str(bad_field)
        return check_message(args, data[self.manager.get_elem_by_id("top.lang")])

    return initialize


def _patched_clean_cmd(original):
    @functools.wraps(original)
    def clean_cmd(args):
        kept = original(args)
        if args.get("finetuning_type") != FINETUNING_TYPE:
            return kept
        # a switch whose default is True must be written when turned off; every aira_moe key is written, in order
        return {name: value for name, value in args.items() if name in kept or (name in METHOD_KEYS and value is False)}

    return clean_cmd


@contextlib.contextmanager
def _inside(block):
    """Render into an already closed layout block (gradio sets its parent on entry; it is put back)."""
    parent = block.parent
    with block:
        yield
    block.parent = parent


def _place_after(block, anchor) -> None:
    """Move ``block`` (just rendered into ``anchor``'s parent) to right after ``anchor`` in the layout."""
    siblings = getattr(anchor.parent, "children", None)
    if siblings is None or block.parent is not anchor.parent or block not in siblings:
        raise missing(f"the LlamaBoard layout around {type(anchor).__name__} (gradio {gr.__version__})")
    siblings.remove(block)
    siblings.insert(siblings.index(anchor) + 1, block)


def _report_paths(model_name, finetuning_type, output_dir) -> Optional[tuple[str, str]]:
    from llamafactory.webui.common import get_save_dir

    if finetuning_type != FINETUNING_TYPE or not model_name or not output_dir:
        return None
    directory = get_save_dir(model_name, finetuning_type, output_dir)
    paths = (os.path.join(directory, REPORT_JSON), os.path.join(directory, REPORT_PNG))
    return paths if all(os.path.isfile(path) for path in paths) else None


def allocation_view(model_name, finetuning_type, output_dir):
    """The allocation box, image and table of the run in ``output_dir``: hidden until calibration has written the
    report (the report files are written atomically, so a file that exists is complete)."""
    from PIL import Image

    from ..calibration.report import format_markdown

    paths = _report_paths(model_name, finetuning_type, output_dir)
    if paths is None:
        return gr.Column(visible=False), None, ""
    with open(paths[0], encoding="utf-8") as handle:
        report = json.load(handle)
    with Image.open(paths[1]) as png:
        image = png.copy()
    return gr.Column(visible=True), image, format_markdown(report)


def _build_panel():
    elements = {}
    with gr.Accordion(open=True, visible=False, elem_id="aira_moe-panel") as panel:
        elements[NOTE] = gr.Markdown()
        for switch, keys in panel_groups():
            elements[_group_element(switch)] = gr.Markdown()
            with gr.Row():
                for key in keys:
                    elements[key.name] = _widget(key)
    return panel, elements


def _stock(elements: dict, name: str):
    """A component the stock tab returned; LlamaBoard's layout changed if it is not there."""
    if name not in elements:
        raise missing(f"the LlamaBoard component {name!r}")
    return elements[name]


def _patched_create_train_tab(original):
    @functools.wraps(original)
    def create_train_tab(engine):
        panel, panel_elements = _build_panel()
        inputs = {panel_elements[key.name] for key in panel_keys()}
        stock_base_elems = engine.manager.get_base_elems
        # the stock tab wires preview / save / load / start to get_base_elems() plus its own inputs: add the panel's
        engine.manager.get_base_elems = lambda: stock_base_elems() | inputs
        try:
            elements = original(engine)
        finally:
            del engine.manager.get_base_elems
        _place_after(panel, _stock(elements, "lora_tab"))
        with _inside(_stock(elements, "loss_viewer").parent):
            with gr.Column(visible=False) as allocation_box:
                allocation_image = gr.Image(interactive=False, elem_id="aira_moe-allocation-image")
                allocation_table = gr.Markdown(elem_id="aira_moe-allocation-table")

        get = engine.manager.get_elem_by_id
        finetuning_type = get("top.finetuning_type")
        output_dir, output_box = _stock(elements, "output_dir"), _stock(elements, "output_box")
        view_inputs = [get("top.model_name"), finetuning_type, output_dir]
        view_outputs = [allocation_box, allocation_image, allocation_table]
        finetuning_type.change(lambda kind: gr.Accordion(visible=kind == FINETUNING_TYPE), [finetuning_type], [panel],
                               queue=False)
        # the runner's monitor rewrites the output box every poll: the allocation appears once calibration wrote it
        for trigger in (finetuning_type, output_dir, output_box):
            trigger.change(allocation_view, view_inputs, view_outputs, queue=False)
        return {**elements, **panel_elements, "aira_moe_tab": panel, "aira_moe_allocation_box": allocation_box,
                "aira_moe_allocation_image": allocation_image, "aira_moe_allocation_table": allocation_table}

    return create_train_tab


def export_lora_from_ui(lang, model_name, finetuning_type, checkpoint_path, export_dir) -> str:
    """The Export tab's export-lora button: the selected aira_moe checkpoint as a standard LoRA in ``export_dir``."""
    from llamafactory.webui.common import get_save_dir
    from llamafactory.webui.locales import ALERTS

    from ..export import export_lora

    checkpoints = list(checkpoint_path or [])
    error = ""
    if not model_name:
        error = ALERTS["err_no_model"][lang]
    elif not export_dir:
        error = ALERTS["err_no_export_dir"][lang]
    elif not checkpoints:
        error = ALERTS["err_no_adapter"][lang]
    elif len(checkpoints) != 1:
        error = message("one_adapter", lang, count=len(checkpoints))
    if not error:
        adapter_dir = get_save_dir(model_name, finetuning_type, checkpoints[0])
        try:
            report = export_lora(adapter_dir, export_dir)
        except UserError as refused:  # the CLI's user errors, same line
            error = one_line(refused)
        else:
            return message("exported", lang, **report)
    gr.Warning(error)
    return error


def _patched_create_export_tab(original):
    @functools.wraps(original)
    def create_export_tab(engine):
        elements = original(engine)
        export_lora_btn = gr.Button(visible=False, elem_id="aira_moe-export-lora")
        _place_after(export_lora_btn, _stock(elements, "export_btn"))
        get = engine.manager.get_elem_by_id
        finetuning_type = get("top.finetuning_type")
        export_lora_btn.click(
            export_lora_from_ui,
            [get("top.lang"), get("top.model_name"), finetuning_type, get("top.checkpoint_path"),
             _stock(elements, "export_dir")],
            [_stock(elements, "info_box")],
        )
        finetuning_type.change(lambda kind: gr.Button(visible=kind == FINETUNING_TYPE), [finetuning_type],
                               [export_lora_btn], queue=False)
        return {**elements, "export_lora_btn": export_lora_btn}

    return create_export_tab


def _add_locales(locales: dict) -> None:
    languages = tuple(locales["lora_tab"])
    for name, entry in panel_locales(languages).items():
        if locales.setdefault(name, entry) != entry:  # LlamaBoard names an element of its own the same
            raise missing(f"a free LlamaBoard locale name for the aira_moe panel element {name!r} (taken)")


def install() -> None:
    """Patch LlamaBoard (idempotent). Raises if the installed LLaMA-Factory lacks what is patched."""
    import llamafactory

    problem = unsupported("llamafactory", llamafactory.__version__)
    if problem is not None:
        raise RuntimeError(f"{problem}.")
    from llamafactory.extras import constants
    from llamafactory.webui import common, interface, locales, runner

    for name in ("METHODS", "PEFT_METHODS"):
        if not hasattr(constants, name):
            raise missing(f"llamafactory.extras.constants.{name}")
    if FINETUNING_TYPE not in constants.METHODS:
        constants.METHODS.append(FINETUNING_TYPE)  # the list and set are shared by name with every webui module
    constants.PEFT_METHODS.add(FINETUNING_TYPE)
    _add_locales(locales.LOCALES)
    replace(interface, "create_train_tab", _patched_create_train_tab)
    replace(interface, "create_export_tab", _patched_create_export_tab)
    replace(runner.Runner, "_parse_train_args", _patched_parse_train_args)
    replace(runner.Runner, "_initialize", _patched_initialize)
    replace(common, "_clean_cmd", _patched_clean_cmd)

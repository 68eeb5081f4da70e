"""aira_moe in LlamaBoard without a browser: the panel is generated from the arguments, the runner carries its keys
(preview, save / load, the check's one-line alert), lora is unchanged, and an unsupported LLaMA-Factory is not
patched. The real-browser run is tests/test_llamaboard_browser.py."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

pytest.importorskip("llamafactory")
pytest.importorskip("gradio")

from aira_moe.cli import main as cli_main  # noqa: E402
from aira_moe.integrations.arguments import METHOD_KEYS  # noqa: E402
from aira_moe.tiny import build_tiny_assets  # noqa: E402
from aira_moe.tuner.config import COLA_STRATEGIES, AiraMoeConfig  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
PANEL_VALUES = {"train.num_A": 2, "train.num_B": 3, "train.cola_strategy": "heuristic", "train.use_layer_wise_rank": True,
                "train.rank_budget": "auto", "train.lod_threshold_M": 2.5, "train.lora_rank": 4}


def build_board():
    """The Train and Export tabs as ``create_ui`` builds them (through the names it calls), with their engine."""
    import gradio as gr
    from llamafactory.webui import interface
    from llamafactory.webui.components import create_top
    from llamafactory.webui.engine import Engine

    engine = Engine()
    with gr.Blocks():
        engine.manager.add_elems("top", create_top())
        with gr.Tab("Train"):
            engine.manager.add_elems("train", interface.create_train_tab(engine))
        with gr.Tab("Export"):
            engine.manager.add_elems("export", interface.create_export_tab(engine))
    return engine


def board_data(engine, assets, **values):
    """Every component's value as LlamaBoard passes it to the runner: defaults, a custom model, the tiny data."""
    data = {element: getattr(element, "value", None) for element in engine.manager.get_elem_list()}
    chosen = {"top.lang": "en", "top.model_name": "Custom", "top.model_path": assets["model"], "top.finetuning_type": "lora",
              "train.dataset_dir": assets["dataset_dir"], "train.dataset": [assets["dataset"]], "train.output_dir": "run",
              "train.config_path": "saved.yaml", "train.compute_type": "fp32", **values}
    for elem_id, value in chosen.items():
        data[engine.manager.get_elem_by_id(elem_id)] = value
    return data


def lora_command(engine, assets):
    from llamafactory.webui.common import gen_cmd

    return gen_cmd(engine.runner._parse_train_args(board_data(engine, assets, **{"train.lora_rank": 4})))


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """One board for the module, in its own working directory (LlamaBoard writes saves/ and llamaboard_* there)."""
    workdir = tmp_path_factory.mktemp("board")
    assets = build_tiny_assets(str(workdir / "tiny"))
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        yield build_board(), assets, workdir
    finally:
        os.chdir(previous)


def test_panel_is_generated_from_the_arguments(monkeypatch):
    from aira_moe.integrations import llamaboard_locales
    from aira_moe.integrations.llamaboard import panel_groups, panel_keys, panel_locales
    from aira_moe.integrations.llamaboard_locales import ZH_HELP

    assert [key.name for key in panel_keys()] == list(METHOD_KEYS)
    switches = [switch for switch, _ in panel_groups()]
    assert switches[0] is None and {"use_layer_wise_rank", "use_awsvd_init", "use_activation_aware"} <= set(switches)
    assert all(keys[0].name == switch for switch, keys in panel_groups()[1:])  # each technique opens with its switch
    collaboration = [key.name for key in panel_groups()[0][1]]
    assert collaboration[:3] == ["num_A", "num_B", "cola_strategy"]
    config = {item.name: item for item in dataclasses.fields(AiraMoeConfig)}
    for key in panel_keys():
        assert key.default == config[key.name].default and key.help == config[key.name].metadata["help"].strip()
    kinds = {key.name: (key.kind, key.choices) for key in panel_keys()}
    assert kinds["cola_strategy"] == ("choice", COLA_STRATEGIES)
    assert kinds["num_A"] == ("int", ()) and kinds["lod_threshold_M"] == ("float", ())
    assert kinds["use_awsvd_init"] == ("bool", ()) and kinds["rank_budget"] == ("yaml", ())  # int or 'auto'
    # every label is the YAML key; the info is the help with the default, in Chinese where translated
    assert set(ZH_HELP) <= set(METHOD_KEYS)
    locales = panel_locales(("en", "ru", "zh", "ko", "ja"))
    for key in panel_keys():
        assert {entry["label"] for entry in locales[key.name].values()} == {key.name}
        assert locales[key.name]["en"]["info"] == f"{key.help} Default: {key.default}."
        assert locales[key.name]["zh"]["info"] == f"{ZH_HELP[key.name]} 默认值：{key.default}。"
    assert locales["aira_moe_group_use_awsvd_init"]["zh"]["value"] == "**AwSVD 初始化**"
    # a key with no translation yet (a new key) shows its English help in Chinese too
    monkeypatch.delitem(llamaboard_locales.ZH_HELP, "num_A")
    num_a = next(key for key in panel_keys() if key.name == "num_A")
    assert panel_locales(("en", "zh"))["num_A"]["zh"]["info"] == f"{num_a.help} 默认值：1。"


def test_panel_values_are_read_as_in_a_yaml_recipe():
    from aira_moe.integrations.llamaboard import argument_value, panel_keys

    keys = {key.name: key for key in panel_keys()}
    assert argument_value(keys["rank_budget"], "auto") == "auto"
    assert argument_value(keys["rank_budget"], "96") == 96
    assert argument_value(keys["activation_normalize"], "true") is True  # YAML's true: the seed's switch, 'minmax'
    assert argument_value(keys["num_A"], 3) == 3
    with pytest.raises(ValueError, match=r"^`num_B` is empty; set a value \(default 1\)\.$"):
        argument_value(keys["num_B"], None)
    with pytest.raises(ValueError, match=r"`rank_budget`=.* is not a single value"):
        argument_value(keys["rank_budget"], "[1,")


def test_method_is_an_adapter_method_everywhere(board):
    from llamafactory.extras.constants import METHODS, PEFT_METHODS
    from llamafactory.webui.control import can_quantize, list_checkpoints

    engine, _, workdir = board
    assert METHODS == ["full", "freeze", "lora", "oft", "aira_moe"] and PEFT_METHODS == {"lora", "oft", "aira_moe"}
    (workdir / "saves" / "Custom" / "aira_moe" / "run0").mkdir(parents=True)
    (workdir / "saves" / "Custom" / "aira_moe" / "run0" / "adapter_model.safetensors").write_bytes(b"")
    listed = list_checkpoints("Custom", "aira_moe")
    assert listed.choices == [("run0", "run0")] and listed.multiselect  # adapters: several may be stacked
    assert can_quantize("aira_moe").interactive and not can_quantize("full").interactive
    assert engine.manager.get_elem_by_id("top.finetuning_type").choices[-1] == ("aira_moe", "aira_moe")


def test_runner_carries_the_panel_and_alerts_with_the_check_line(board, capsys):
    from llamafactory.webui.common import _clean_cmd, gen_cmd

    engine, assets, workdir = board
    runner, elem = engine.runner, engine.manager.get_elem_by_id
    data = board_data(engine, assets, **{"top.finetuning_type": "aira_moe"}, **PANEL_VALUES)
    args = runner._parse_train_args(data)
    assert {key: args[key] for key in ("num_A", "num_B", "cola_strategy", "use_layer_wise_rank", "rank_budget",
                                       "lod_threshold_M", "lora_rank", "lora_target")} == {
        "num_A": 2, "num_B": 3, "cola_strategy": "heuristic", "use_layer_wise_rank": True, "rank_budget": "auto",
        "lod_threshold_M": 2.5, "lora_rank": 4, "lora_target": "all"}  # lora_rank from the LoRA panel
    assert set(METHOD_KEYS) <= set(args)
    command = gen_cmd(args)
    for line in ("--finetuning_type aira_moe", "--num_A 2", "--num_B 3", "--cola_strategy heuristic",
                 "--use_layer_wise_rank True", "--rank_budget auto", "--use_awsvd_init False"):  # False kept
        assert line in command, command
    assert runner._initialize(data, do_train=True, from_preview=True) == ""
    ppo = runner._parse_train_args({**data, elem("train.training_stage"): "PPO", elem("train.reward_model"): ["rm"]})
    assert (ppo["reward_model"], ppo["reward_model_type"]) == ("saves/Custom/aira_moe/rm", "lora")  # an adapter

    # a budget the 2-layer model cannot take: the alert is the line `aira-moe check` prints for the same arguments
    bad = board_data(engine, assets, **{"top.finetuning_type": "aira_moe"}, **{**PANEL_VALUES, "train.rank_budget": "1000"})
    alert = runner._initialize(bad, do_train=True, from_preview=True)
    assert alert.startswith("`rank_budget`=1000 cannot be met by 2 layers"), alert
    # Start with it: the alert, and no process, no output dir
    assert list(runner.run_train(bad)) == [{elem("train.output_box"): alert}]
    assert runner.trainer is None and not os.path.exists(workdir / "saves" / "Custom" / "aira_moe" / "run")
    bad_yaml = workdir / "bad.yaml"  # what Start would have written as training_args.yaml
    bad_yaml.write_text(yaml.safe_dump(_clean_cmd(runner._parse_train_args(bad))))
    assert cli_main(["check", str(bad_yaml)]) == 2
    assert capsys.readouterr().err.strip() == f"aira-moe check: {alert}"
    # an emptied field and a LoRA-only option get the same alert path
    empty = board_data(engine, assets, **{"top.finetuning_type": "aira_moe", "train.num_A": None})
    assert runner._initialize(empty, do_train=True, from_preview=False) == "`num_A` is empty; set a value (default 1)."
    pissa = board_data(engine, assets, **{"top.finetuning_type": "aira_moe", "train.use_pissa": True})
    assert "LoRA-only" in runner._initialize(pissa, do_train=True, from_preview=True)

    # an output dir holding this run, finished: the seam would train nothing, so LlamaBoard says so instead
    done = workdir / "saves" / "Custom" / "aira_moe" / "done"
    done.mkdir(parents=True)
    for name, content in (("trainer_state.json", {"global_step": 4, "max_steps": 4}), ("all_results.json", {}),
                          ("adapter_config.json", {})):
        (done / name).write_text(json.dumps(content))
    finished = board_data(engine, assets, **{"top.finetuning_type": "aira_moe", "train.output_dir": "done"}, **{
        key: value for key, value in PANEL_VALUES.items() if key != "train.output_dir"})
    assert runner._initialize(finished, do_train=True, from_preview=True) == (
        "The run in saves/Custom/aira_moe/done is complete; nothing would be trained. Choose another output dir (or "
        "set overwrite_output_dir in the extra arguments).")

    # Save arguments / Load arguments round-trip every panel key
    runner.save_args(data)
    saved = yaml.safe_load((workdir / "llamaboard_config" / "saved.yaml").read_text())
    assert {key: saved[f"train.{key}"] for key in ("num_A", "cola_strategy", "rank_budget")} == {
        "num_A": 2, "cola_strategy": "heuristic", "rank_budget": "auto"}
    loaded = runner.load_args("en", "saved.yaml")
    for key in METHOD_KEYS:
        assert loaded[elem(f"train.{key}")] == data[elem(f"train.{key}")], key


def test_allocation_view_shows_the_report(board):
    from aira_moe.calibration.report import write_report
    from aira_moe.integrations.llamaboard import allocation_view

    _, _, workdir = board
    box, image, table = allocation_view("Custom", "aira_moe", "calibrated")
    assert box.visible is False and image is None  # nothing calibrated yet
    report = {"config": {"r": 4, "theta_type": "lod", "objective_function": "log"}, "rank_sum": 8, "num_units": 2,
              "layers": [{"unit": "model.layers.0", "theta": 0.25, "rank": 3, "modules": ["q"]},
                         {"unit": "model.layers.1", "theta": 0.5, "rank": 5, "modules": ["q"]}],
              "trainable_params": 80, "uniform_rank_params": 80, "params_ratio_vs_uniform": 1.0, "seconds": {}}
    write_report(report, str(workdir / "saves" / "Custom" / "aira_moe" / "calibrated"))
    box, image, table = allocation_view("Custom", "aira_moe", "calibrated")
    assert box.visible is True and image.size[0] > 100
    assert "| model.layers.0 | 0.25 | 3 |" in table and "| model.layers.1 | 0.5 | 5 |" in table and "rank sum 8" in table
    assert allocation_view("Custom", "lora", "calibrated")[0].visible is False


def test_language_switch_and_export_lora_refusals(board):
    from aira_moe.integrations.llamaboard import export_lora_from_ui
    from aira_moe.integrations.llamaboard_locales import ZH_HELP

    engine, _, workdir = board
    updates = engine.change_lang("zh")
    num_a = updates[engine.manager.get_elem_by_id("train.num_A")]
    assert num_a.label == "num_A" and num_a.info == f"{ZH_HELP['num_A']} 默认值：1。"
    assert updates[engine.manager.get_elem_by_id("train.aira_moe_tab")].label.startswith("AIRA-MoE 参数设置")
    two = export_lora_from_ui("en", "Custom", "aira_moe", ["a", "b"], str(workdir / "lora"))
    assert two == "export-lora writes one adapter; select exactly one checkpoint (selected: 2)."
    missing = export_lora_from_ui("en", "Custom", "aira_moe", ["absent"], str(workdir / "lora"))
    assert "absent" in missing and "\n" not in missing and not (workdir / "lora").exists()


@pytest.mark.slow
def test_lora_is_unchanged_and_an_unsupported_llamafactory_is_not_patched(board, tmp_path):
    """The same LlamaBoard in a process where the hook sees an unsupported LLaMA-Factory (the table narrowed before
    import): nothing patched, stock methods and components; and its lora command is the hooked board's."""
    engine, assets, _ = board
    script = textwrap.dedent(f"""
        import json, os, sys
        import aira_moe_startup
        aira_moe_startup.SUPPORTED["llamafactory"] = ("0.0.1", "0.0.2")
        sys.path.insert(0, {TESTS!r})
        from test_llamaboard import build_board, lora_command
        from llamafactory.extras.constants import METHODS, PEFT_METHODS
        from llamafactory.webui import common, interface
        from llamafactory.webui.runner import Runner
        engine = build_board()
        patched = [getattr(item, "__aira_moe_patched__", False) for item in (interface.create_train_tab,
                   interface.create_export_tab, Runner._parse_train_args, Runner._initialize, common._clean_cmd)]
        print(json.dumps({{"methods": METHODS, "peft": sorted(PEFT_METHODS), "patched": patched,
                          "ids": sorted(engine.manager._id_to_elem), "lora": lora_command(engine, {assets!r})}}))
    """)
    env = {key: value for key, value in os.environ.items() if key != "AIRA_MOE_DISABLE_STARTUP"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stock = json.loads(result.stdout.strip().splitlines()[-1])
    assert stock["methods"] == ["full", "freeze", "lora", "oft"] and stock["peft"] == ["lora", "oft"]
    assert stock["patched"] == [False] * 5
    from aira_moe.integrations.llamaboard import panel_locales

    hooked_ids = set(engine.manager._id_to_elem)
    added = hooked_ids - set(stock["ids"])
    assert set(stock["ids"]) <= hooked_ids
    # what the hook adds: the panel's fields, titles and note, the allocation view, the export-lora button
    ours = set(panel_locales(("en",))) | {"aira_moe_allocation_box", "aira_moe_allocation_table"}
    assert {elem_id.split(".", 1)[1] for elem_id in added} == ours and set(METHOD_KEYS) <= ours
    assert lora_command(engine, assets) == stock["lora"]  # lora with the hook: the stock command, byte for byte

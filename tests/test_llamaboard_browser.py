"""LlamaBoard (``llamafactory-cli webui``) with aira_moe, driven in a real browser (Debian's chromium + chromedriver,
selenium): pick aira_moe, set its keys, preview, train the tiny default, see the allocation, chat with the checkpoint,
export it merged and as a standard LoRA. Screenshots of each stage go to tmp/artifacts/llamaboard/ (or
$AIRA_MOE_ARTIFACTS); ``llamaboard_readme.png`` there is the README's picture (docs/llamaboard.png)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

pytest.importorskip("llamafactory")
pytest.importorskip("gradio")

from aira_moe.tiny import build_tiny_assets  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                       "(apt-get install chromium chromium-driver; .ci/run installs them)"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.environ.get("AIRA_MOE_ARTIFACTS", os.path.join(ROOT, "tmp", "artifacts", "llamaboard"))
README_WIDTH = 1000  # the README picture is a downscaled, palette PNG of the allocation stage


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Board:
    """The LlamaBoard page in chromium: find LlamaBoard's components by their (English) labels, ours by elem_id."""

    def __init__(self, driver, server_log):
        self.driver = driver
        self.server_log = server_log
        self.started = time.time()
        self.stages = {}

    def wait_for(self, condition, seconds, what):
        """Poll ``condition`` until it is truthy; on timeout a screenshot and the server's log tail."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, seconds, poll_frequency=0.25).until(lambda _: condition())
        except TimeoutException:
            self.shot("failed")
            raise AssertionError(f"{what} within {seconds} s; webui log:\n{self.server_log.read_text()[-4000:]}") from None

    def visible(self, by, selector):
        found = [element for element in self.driver.find_elements(by, selector) if element.is_displayed()]
        return found[0] if found else None

    def find(self, by, selector, seconds=30):
        self.wait_for(lambda: self.visible(by, selector), seconds, f"no visible {selector}")
        return self.visible(by, selector)

    def field(self, label, tag="textarea"):
        from selenium.webdriver.common.by import By

        return self.find(By.XPATH, f"//label[.//span[@data-testid='block-info' and normalize-space()='{label}']]//{tag}")

    def type(self, element, text):
        from selenium.webdriver.common.keys import Keys

        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        element.send_keys(str(text))
        element.send_keys(Keys.TAB)  # blur: gradio sends the value with the next event either way

    def choose(self, listbox, option, seconds=30):
        """Open a dropdown (an <input role=listbox>) and click one of its options."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        listbox.click()
        choice = self.find(By.CSS_SELECTOR, f"ul[role=listbox] li[aria-label='{option}']", seconds)
        choice.click()
        listbox.send_keys(Keys.ESCAPE)
        time.sleep(0.3)

    def dropdown(self, label):
        """A single-choice dropdown (its input carries the label) or a multi-choice one (inside a labelled <label>)."""
        from selenium.webdriver.common.by import By

        return self.find(By.XPATH, f"//input[@role='listbox' and @aria-label='{label}'] | "
                                   f"//label[.//span[@data-testid='block-info' and normalize-space()='{label}']]//input")

    def ours(self, key, tag="input"):
        from selenium.webdriver.common.by import By

        return self.find(By.CSS_SELECTOR, f"#aira_moe-{key} {tag}")

    def click(self, text):
        from selenium.webdriver.common.by import By

        button = self.find(By.XPATH, f"//button[normalize-space()='{text}' and not(@role='tab')]")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()

    def text_shown(self, text):
        from selenium.webdriver.common.by import By

        return self.visible(By.XPATH, f"//*[contains(normalize-space(), '{text}') and not(*[contains(normalize-space(), '{text}')])]")

    def slider_value(self, label):
        """The number box of a gradio slider."""
        from selenium.webdriver.common.by import By

        return self.find(By.XPATH, f"//span[@data-testid='block-info' and normalize-space()='{label}']"
                                   "/ancestor::div[contains(@class, 'block')][1]//input[@type='number']")

    def generating(self):
        """Whether a gradio event is still streaming (its components show the pending state)."""
        from selenium.webdriver.common.by import By

        return any(element.is_displayed() for element in self.driver.find_elements(By.CSS_SELECTOR, ".pending, .generating"))

    def value_shown(self, text):
        """The value of a visible textbox (LlamaBoard's info boxes) that contains ``text``, else None."""
        from selenium.webdriver.common.by import By

        for element in self.driver.find_elements(By.TAG_NAME, "textarea"):
            value = element.get_attribute("value") or ""
            if text in value and element.is_displayed():
                return value
        return None

    def stage(self, name):
        self.stages[name] = round(time.time() - self.started, 1)

    def tall_shot(self, name, element, width, height):
        """A screenshot from ``element`` down, in a ``width`` x ``height`` window, with no notification on top."""
        from selenium.webdriver.common.by import By

        for close in self.driver.find_elements(By.CSS_SELECTOR, ".toast-close"):
            if close.is_displayed():
                close.click()
        previous = self.driver.get_window_size()
        self.driver.set_window_size(width, height)
        try:
            return self.shot(name, element)
        finally:
            self.driver.set_window_size(previous["width"], previous["height"])

    def shot(self, name, element=None):
        if element is not None:
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
            time.sleep(0.5)
        path = os.path.join(ARTIFACTS, f"llamaboard_{name}.png")
        self.driver.save_screenshot(path)
        return path


@pytest.fixture
def board_server(tmp_path):
    """LlamaBoard on 127.0.0.1 (a free port), in a fresh working directory, CPU only."""
    workdir = tmp_path / "board"
    workdir.mkdir()
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "BROWSER": "true"}  # launch(inbrowser=True) must not open a browser of its own
    env.pop("AIRA_MOE_DISABLE_STARTUP", None)
    log = open(tmp_path / "webui.log", "w", encoding="utf-8")
    server = subprocess.Popen(["llamafactory-cli", "webui"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if server.poll() is not None:
                raise AssertionError(f"webui exited ({server.returncode}):\n{(tmp_path / 'webui.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    if page.status == 200:
                        break
            except OSError:  # not listening yet
                time.sleep(0.5)
        else:
            raise AssertionError("webui did not start in 180 s")
        yield f"http://127.0.0.1:{port}", workdir, tmp_path / "webui.log"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000", "--lang=en-US"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_aira_moe_in_llamaboard(board_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    started = time.time()
    url, workdir, server_log = board_server
    assets = build_tiny_assets(str(tmp_path / "tiny"))
    os.makedirs(ARTIFACTS, exist_ok=True)
    board = Board(browser, server_log)
    browser.get(url)
    board.stage("page")
    method = board.dropdown("Finetuning method")

    # top: a custom model path; the method dropdown offers aira_moe and shows the panel
    model_name = board.dropdown("Model name")
    model_name.send_keys("Custom")
    board.choose(model_name, "Custom")
    board.wait_for(lambda: board.field("Model path").get_attribute("value") == "", 10, "model path reset")
    board.type(board.field("Model path"), assets["model"])
    assert board.visible(By.ID, "aira_moe-num_A") is None  # lora: no AIRA-MoE panel
    board.choose(method, "aira_moe")
    board.type(board.field("Data dir"), assets["dataset_dir"])
    board.choose(board.dropdown("Dataset"), assets["dataset"])
    board.choose(board.dropdown("Compute type"), "fp32")
    board.type(board.field("Epochs"), "2.0")
    board.type(board.field("Max samples"), "80")  # 2 x 5 steps of 2 x 8 samples; the loss is logged every 5

    # the panel: collaboration keys and a technique
    board.type(board.ours("num_A"), 2)
    board.type(board.ours("num_B"), 3)
    board.choose(board.ours("cola_strategy"), "heuristic")
    board.ours("use_layer_wise_rank").click()
    panel_shot = board.shot("1_panel", board.ours("num_A"))
    board.stage("set")

    # the default rank_budget (64) cannot be spread over 2 layers with max_rank 16: LlamaBoard's alert, the check's line
    board.click("Preview command")
    board.wait_for(lambda: board.text_shown("`rank_budget`=64"), 60, "no rank_budget alert")
    board.shot("2_alert")
    board.type(board.ours("rank_budget", "textarea"), "auto")
    board.click("Preview command")
    board.wait_for(lambda: board.text_shown("llamafactory-cli train"), 60, "no preview")
    preview = board.text_shown("llamafactory-cli train").text
    for line in ("--finetuning_type aira_moe", "--num_A 2", "--num_B 3", "--cola_strategy heuristic",
                 "--use_layer_wise_rank True", "--rank_budget auto", "--lora_rank 8"):
        assert line in preview, preview
    board.shot("3_preview", board.find(By.XPATH, "//button[normalize-space()='Preview command']"))
    board.stage("previewed")

    # train; the allocation appears beside the loss plot
    output_dir_name = board.dropdown("Output dir").get_attribute("value")
    board.click("Start")
    board.wait_for(lambda: board.text_shown("Finished."), 240, "training did not finish")
    image = board.find(By.CSS_SELECTOR, "#aira_moe-allocation-image img", 30)
    table = board.find(By.CSS_SELECTOR, "#aira_moe-allocation-table")
    board.stage("trained")
    board.shot("4_trained", board.find(By.XPATH, "//button[normalize-space()='Start']"))
    readme_shot = board.tall_shot("readme_full", board.find(By.ID, "aira_moe-panel"), 1600, 2900)  # panel .. table
    run_dir = workdir / "saves" / "Custom" / "aira_moe" / output_dir_name
    for name in ("adapter_model.safetensors", "adapter_config.json", "aira_moe_allocation.json", "aira_moe_allocation.png"):
        assert (run_dir / name).is_file(), sorted(os.listdir(run_dir))
    report = json.loads((run_dir / "aira_moe_allocation.json").read_text())
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert (config["num_A"], config["num_B"], config["cola_strategy"]) == (2, 3, "heuristic")
    assert report["rank_sum"] == 2 * 8 and len(report["layers"]) == 2  # 'auto': num_layers x lora_rank
    ranks = {row["unit"].rsplit(".", 1)[-1]: row["rank"] for row in report["layers"]}
    assert all(f"{unit}" in table.text for unit in ranks) and str(report["rank_sum"]) in table.text, table.text
    assert image.get_attribute("src")
    saved = yaml.safe_load((run_dir / "training_args.yaml").read_text())
    assert (saved["num_A"], saved["num_B"], saved["use_layer_wise_rank"], saved["rank_budget"]) == (2, 3, True, "auto")

    # chat with the checkpoint (the adapter on the base, loaded by LlamaBoard's chat model)
    board.find(By.XPATH, "//button[@role='tab' and normalize-space()='Chat']").click()
    board.choose(board.dropdown("Checkpoint path"), output_dir_name)
    board.click("Load model")
    board.wait_for(lambda: board.value_shown("Model loaded"), 120, "chat model not loaded")
    board.type(board.slider_value("Maximum new tokens"), 24)
    board.type(board.find(By.CSS_SELECTOR, "textarea[placeholder='Input...']"), "What colour is the sky?")
    board.click("Submit")
    reply = lambda: board.visible(By.CSS_SELECTOR, "[data-testid='bot'] .prose, .message.bot .prose")
    board.wait_for(lambda: reply() is not None and reply().text.strip(), 120, "no reply")
    board.wait_for(lambda: not board.generating(), 60, "the reply did not end")
    board.shot("5_chat", board.find(By.XPATH, "//button[normalize-space()='Submit']"))
    board.stage("chatted")

    # export: merged by LlamaBoard's Export button, and as a standard LoRA by ours
    board.find(By.XPATH, "//button[@role='tab' and normalize-space()='Export']").click()
    export_dir, lora_dir = tmp_path / "merged", tmp_path / "lora"
    board.type(board.field("Export dir"), str(export_dir))
    board.click("Export")
    board.wait_for(lambda: (export_dir / "config.json").is_file() and any(export_dir.glob("*.safetensors")), 120,
                   "merged export not written")
    board.type(board.field("Export dir"), str(lora_dir))
    board.click("Export as standard LoRA (aira-moe export-lora, for vLLM / SGLang)")
    board.wait_for(lambda: board.value_shown("Wrote a standard LoRA adapter"), 120, "export-lora did not finish")
    board.shot("6_export")
    board.stage("exported")
    lora_config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert lora_config["peft_type"] == "LORA", lora_config
    assert f"(r={lora_config['r']}," in board.value_shown("Wrote a standard LoRA adapter")
    print(f"[llamaboard] browser test {time.time() - started:.0f} s (seconds at each stage: {board.stages}); "
          f"screenshots in {ARTIFACTS}", file=sys.stderr)
    _write_readme_picture(readme_shot, panel_shot)


def _write_readme_picture(*shots):
    """A small palette PNG of the allocation stage for the README (docs/llamaboard.png is a copy of it)."""
    from PIL import Image

    with Image.open(shots[0]) as full:
        scaled = full.convert("RGB").resize((README_WIDTH, round(full.height * README_WIDTH / full.width)), Image.LANCZOS)
    scaled.quantize(colors=64).save(os.path.join(ARTIFACTS, "llamaboard_readme.png"), optimize=True)

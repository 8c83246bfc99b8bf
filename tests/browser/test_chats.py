"""The chats a person keeps (issue #23, points 2, 3, 4, 6 and 8): saved in the browser chat by
chat, across tabs, reloads, server restarts and sizes; edits and retries kept as versions;
Continue after a length cut; exported files named after their chat. Against the scripted model."""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.chat_page import ChatPage
from tests.browser.conftest import SCRIPT
from tests.helpers import free_port
from tests.serve_process import running

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
EDITOR = "#conversation textarea.edit-textarea"  # the box Gradio opens to edit a message
EXPORT = re.compile(r"Export conversation")


def stored_chats(page) -> list[dict]:
    """The chats the page keeps in the browser's storage (assets/chats.js)."""
    return page.evaluate(
        """() => Object.keys(localStorage).filter((key) => key.startsWith("falcon-chat/"))
                 .map((key) => JSON.parse(localStorage.getItem(key)))"""
    )


def edit_message(chat: ChatPage, index: int, text: str) -> None:
    """Open a user message's edit box and type `text` there (not sent)."""
    message = chat.user_messages.nth(index)
    message.hover()
    # Its buttons follow its row (Gradio 6.31's Chatbot).
    buttons = message.locator("xpath=ancestor::div[contains(@class,'message-row')]/following-sibling::div[1]")
    buttons.get_by_role("button", name="Edit").click()
    chat.page.locator(EDITOR).fill(text)


def versions(chat: ChatPage):
    return chat.page.locator("#conversation .falcon-versions")


# -- saved chats: tabs, reloads, restarts --------------------------------------------------------


def test_two_tabs_each_add_a_chat_and_a_fresh_tab_shows_both(open_scripted):
    first, second = open_scripted("desktop"), open_scripted("desktop")  # one browser, two tabs
    first.ask("Chat from the first tab")
    second.ask("Chat from the second tab")
    # Each tab's list follows the other's writes, and neither wrote over the other's chat.
    expect(first.saved_chat("Chat from the second tab")).to_be_visible()
    expect(second.saved_chat("Chat from the first tab")).to_be_visible()

    fresh = open_scripted("desktop")
    expect(fresh.saved_chat("Chat from the first tab")).to_be_visible()
    expect(fresh.saved_chat("Chat from the second tab")).to_be_visible()
    fresh.open_saved_chat("Chat from the first tab")
    expect(fresh.user_messages.first).to_have_attribute(
        "aria-label", "user's message: Chat from the first tab"
    )


def test_a_reload_after_a_reply_reopens_the_chat_and_its_address_opens_it_anywhere(open_scripted):
    chat = open_scripted("desktop")
    chat.ask("Hi")
    chat.new_chat()
    reply = chat.ask("Keep my place")
    address = chat.page.url
    assert re.search(r"#chat=\w+$", address), address

    chat.page.reload()
    expect(chat.user_messages).to_have_count(1)
    expect(chat.user_messages.first).to_have_attribute("aria-label", "user's message: Keep my place")
    assert chat.reply_text() == reply
    expect(chat.saved_chat("Keep my place")).to_have_attribute("aria-current", "page")

    elsewhere = open_scripted("desktop")  # the address, bookmarked, opens that chat in another tab
    elsewhere.page.goto(address)
    expect(elsewhere.user_messages.first).to_have_attribute("aria-label", "user's message: Keep my place")
    elsewhere.open_saved_chat("Hi")
    expect(elsewhere.user_messages.first).to_have_attribute("aria-label", "user's message: Hi")
    assert elsewhere.page.url != address and "#chat=" in elsewhere.page.url


def test_a_reload_during_a_reply_keeps_the_message_and_what_came_of_the_reply(open_scripted):
    chat = open_scripted("desktop")
    chat.send("Please answer slowly")
    expect(chat.bot_messages.last).to_contain_text("word after")

    chat.page.reload()

    expect(chat.user_messages).to_have_count(1)
    expect(chat.user_messages.first).to_have_attribute("aria-label", "user's message: Please answer slowly")
    expect(chat.bot_messages.last).to_contain_text("word after")
    expect(chat.bot_messages.last).to_contain_text("The page was reloaded before this reply ended.")
    expect(chat.offered("Continue")).to_be_visible()
    expect(chat.offered("Retry")).to_be_visible()
    expect(chat.textbox).to_be_editable()
    assert chat.reply_text().startswith("word after")  # the model's words, the note apart


# Records, in the page, whether the conversation ever showed the note of a reply cut by a reload.
WATCH_FOR_INTERRUPTED_NOTE = """() => {
  window.sawInterrupted = false;
  new MutationObserver(() => {
    const shown = document.querySelector("#conversation");
    if (shown && shown.textContent.includes("The page was reloaded")) window.sawInterrupted = true;
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_a_reply_this_tab_still_writes_is_not_marked_interrupted_when_its_chat_opens_again(open_scripted):
    """Another chat opened by its address while a reply streams (a bookmark in the same tab), then
    the replying chat again: that chat was settled as interrupted by a reload, its note shown and
    saved over the reply still coming."""
    chat = open_scripted("desktop")
    chat.ask("The first chat")
    first = chat.page.url
    chat.new_chat()
    chat.send("Please answer slowly")
    expect(chat.bot_messages.last).to_contain_text("word after")
    replying = chat.page.url
    chat.page.evaluate(WATCH_FOR_INTERRUPTED_NOTE)

    chat.page.goto(first)  # the same document: only the address's #chat= changes
    expect(chat.user_messages.first).to_have_attribute("aria-label", "user's message: The first chat")
    chat.page.goto(replying)
    expect(chat.user_messages.first).to_have_attribute("aria-label", "user's message: Please answer slowly")
    words = len(chat.reply_text().split())
    chat.page.wait_for_function(  # the reply goes on, here
        "(words) => document.querySelectorAll('#conversation [data-testid=bot]')[0]"
        ".getAttribute('aria-label').split(/\\s+/).length > words + 1",
        arg=words,
    )
    chat.stop()
    chat.wait_until_idle()
    expect(chat.bot_messages.last).to_contain_text("Stopped.")
    assert not chat.page.evaluate("() => window.sawInterrupted")
    assert "The page was reloaded" not in str(stored_chats(chat.page))


@contextlib.contextmanager
def app_process(port: int):
    """The app in a process of its own (tests/browser/scripted_app.py), ended when done."""
    command = [sys.executable, "-m", "tests.browser.scripted_app", str(port)]
    with running(command, f"http://127.0.0.1:{port}/healthz", name="falcon-chat", cwd=ROOT):
        yield f"http://127.0.0.1:{port}/"


def test_a_server_restart_keeps_the_chats_and_the_system_prompt(new_page):
    page = new_page()
    port = free_port()
    with app_process(port) as url:
        chat = ChatPage(page, url).open()
        chat.open_settings()
        chat.set_system_prompt("You are a pirate.")
        chat.ask("Before the restart")
    with app_process(port):  # the same address, a new process
        page.reload()
        expect(chat.user_messages.first).to_have_attribute("aria-label", "user's message: Before the restart")
        expect(chat.saved_chat("Before the restart")).to_be_visible()
        chat.open_settings()
        expect(page.get_by_label("System prompt", exact=True).filter(visible=True)).to_have_value(
            "You are a pirate."
        )
        chat.ask("After the restart")
        expect(chat.user_messages).to_have_count(2)


def test_a_setting_changed_before_the_page_restores_the_saved_ones_is_kept(open_scripted):
    """On a loaded machine Gradio's load step (which restores the saved settings) can come after
    a person's first keystrokes, and it put the saved or default value back over what they typed
    (the slider showing one value and the request sending another). The restore keeps a setting
    that no longer holds its default, and restores the others."""
    chat = open_scripted("desktop")
    restore = """([saved, current]) => {
      localStorage.setItem("falcon-chat-settings", JSON.stringify(saved));
      return window.falconChat.restoredSettings(
        [null, [0, 2]], ["", 0.6], current);
    }"""
    # the person typed a temperature of 0: it stays; the system prompt was untouched: restored
    assert chat.page.evaluate(restore, [["Be brief.", 1.5], ["", 0]]) == ["Be brief.", 0]
    # nothing typed: both come back; a saved value out of range leaves the input as it is
    assert chat.page.evaluate(restore, [["Be brief.", 1.5], ["", 0.6]]) == ["Be brief.", 1.5]
    assert chat.page.evaluate(restore, [["Be brief.", 9], ["", 0.6]]) == ["Be brief.", 0.6]


# -- size ----------------------------------------------------------------------------------------

# Chats written into the browser's storage as the page writes them: `count` chats of `turns`
# turns, each message `chars` long.
MAKE_CHATS = """([count, turns, chars]) => {
  const ids = [];
  for (let n = 0; n < count; n++) {
    const id = "made" + n, messages = [];
    for (let t = 0; t < turns; t++) {
      for (const role of ["user", "assistant"]) {
        const text = (role === "user" ? `Question ${t} of chat ${n} ` : "An answer ").padEnd(chars, "x");
        messages.push({role, content: [{type: "text", text}], metadata: null, options: null});
      }
    }
    localStorage.setItem("falcon-chat/" + id, JSON.stringify(
      {id, title: `Made chat ${n}`, created: n, updated: n, messages, versions: {}, replying: null}));
    ids.push(id);
  }
  return ids;
}"""


def test_a_chat_larger_than_a_request_may_be_still_goes_on(open_scripted, scripted_backend):
    """2.4 MB of conversation, over the server's 2 MiB request limit: the page sends its newest
    turns, as many as a request may carry (far more than the model's context holds), and says
    how many older ones the model did not see."""
    chat = open_scripted("desktop")
    (made,) = chat.page.evaluate(MAKE_CHATS, [1, 30, 40_000])
    chat.page.goto(f"{chat.url}#chat={made}")
    expect(chat.user_messages).to_have_count(30)

    chat.send("And after all that?")
    expect(chat.bot_messages).to_have_count(31)
    expect(chat.figures.last).to_contain_text("older turns left out")
    chat.wait_until_idle()
    assert chat.reply_text() == "A short reply."
    assert scripted_backend.prompts[-1].endswith("User: And after all that?\nFalcon:")
    expect(chat.page.get_by_text("Error", exact=True)).to_have_count(0)
    # Its export, which would need all of it, says so in one sentence.
    chat.page.get_by_role("button", name=EXPORT).click()
    expect(
        chat.page.get_by_text(re.compile(r"This chat is too long to export here \(2\.\d MB"))
    ).to_be_visible()


def test_two_hundred_saved_chats_are_all_listed_searched_and_renamed(open_scripted):
    """200 chats of 10 KB (2 MB) in all: each is its own entry, so a new chat saves beside them
    (a save once posted every chat to the server, which refused it past 2 MiB)."""
    chat = open_scripted("desktop")
    chat.page.evaluate(MAKE_CHATS, [200, 5, 1_000])
    chat.page.reload()
    chats = chat.page.locator("#saved-chats a.falcon-chat-link")
    expect(chats).to_have_count(200)
    chat.ask("One more chat")
    expect(chats).to_have_count(201)
    expect(chats.first).to_have_text("One more chat")  # newest first

    search = chat.page.get_by_role("searchbox", name="Search chats")
    search.fill("question 3 of chat 137")  # words inside a chat, not only its title
    expect(chats).to_have_count(1)
    expect(chats.first).to_have_text("Made chat 137")
    chat.page.get_by_role("button", name="Rename \u201cMade chat 137\u201d").click()
    name = chat.page.get_by_role("textbox", name="Name of this chat")
    name.fill("Budget for the trip")
    name.press("Enter")
    search.fill("")
    expect(chat.saved_chat("Budget for the trip")).to_be_visible()

    fresh = open_scripted("desktop")
    expect(fresh.page.locator("#saved-chats a.falcon-chat-link")).to_have_count(201)
    expect(fresh.saved_chat("Budget for the trip")).to_be_visible()


# -- edits and versions --------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_an_edit_left_open_is_cancelled_when_another_chat_opens(open_scripted, scripted_backend, size):
    chat = open_scripted(size)
    chat.ask("The first chat")
    chat.new_chat()
    chat.ask("The second chat")
    edit_message(chat, 0, "Half-typed edit")

    chat.show_saved_chats()  # on a phone, the drawer
    chat.page.locator("#new-chat").click()
    expect(chat.page.locator(EDITOR)).to_have_count(0)
    chat.ask("A third chat")
    chat.open_saved_chat("The second chat")
    expect(chat.page.locator(EDITOR)).to_have_count(0)  # nor does it reopen there
    expect(chat.user_messages.first).to_have_attribute("aria-label", "user's message: The second chat")
    expect(chat.user_messages).to_have_count(1)
    assert "Half-typed" not in str(stored_chats(chat.page))


def test_enter_sends_an_edit_shift_enter_adds_a_line_and_escape_cancels(open_scripted, scripted_backend):
    chat = open_scripted("desktop")
    chat.ask("Frist line")
    edit_message(chat, 0, "Not this")
    chat.page.keyboard.press("Escape")
    expect(chat.page.locator(EDITOR)).to_have_count(0)
    expect(chat.user_messages.first).to_have_attribute("aria-label", "user's message: Frist line")
    expect(chat.stop_button).to_be_hidden()  # Escape cancelled the edit, nothing else

    edit_message(chat, 0, "First line")
    chat.page.keyboard.press("Shift+Enter")
    chat.page.keyboard.type("Second line")
    chat.page.keyboard.press("Enter")
    expect(chat.figures).to_have_count(1)
    chat.wait_until_idle()
    assert scripted_backend.prompts[-1] == "User: First line\nSecond line\nFalcon:"


def test_an_edit_keeps_the_turns_it_replaces_as_a_version_to_go_back_to(open_scripted, scripted_backend):
    chat = open_scripted("desktop")
    chat.ask("What is the capital of Franse?")
    chat.ask("And its population?")
    edit_message(chat, 0, "What is the capital of France?")
    chat.page.keyboard.press("Enter")
    expect(chat.figures).to_have_count(1)
    chat.wait_until_idle()
    assert scripted_backend.prompts[-1] == "User: What is the capital of France?\nFalcon:"
    expect(versions(chat)).to_have_count(1)
    expect(versions(chat).first).to_contain_text("2/2")

    chat.page.get_by_role("button", name="Previous version").click()
    expect(chat.user_messages).to_have_count(2)  # both replaced turns are back
    expect(chat.user_messages.first).to_have_attribute(
        "aria-label", "user's message: What is the capital of Franse?"
    )
    expect(versions(chat).first).to_contain_text("1/2")
    chat.page.reload()  # versions are kept with the chat
    expect(versions(chat).first).to_contain_text("1/2")
    chat.page.get_by_role("button", name="Next version").click()
    expect(chat.user_messages).to_have_count(1)
    expect(chat.user_messages.first).to_have_attribute(
        "aria-label", "user's message: What is the capital of France?"
    )
    chat.ask("Thanks")  # the conversation goes on from the version shown
    assert scripted_backend.prompts[-1].startswith(
        "User: What is the capital of France?\nFalcon: A short reply."
    )


def test_retry_keeps_the_reply_it_replaces_as_a_version(open_scripted, scripted_backend):
    chat = open_scripted("phone")
    chat.open_settings()
    chat.set_number("Max new tokens", 2)
    chat.ask("Some math please")
    first = chat.reply_text()
    chat.open_settings()
    chat.set_number("Max new tokens", 4)
    chat.close_settings()
    chat.page.get_by_role("button", name="Retry", exact=True).click()
    expect(versions(chat).first).to_contain_text("2/2")
    chat.wait_until_idle()
    second = chat.reply_text()
    assert second.startswith(first) and second != first

    chat.page.get_by_role("button", name="Previous version").click()
    assert chat.reply_text() == first
    expect(chat.bot_messages).to_have_count(1)
    expect(chat.user_messages).to_have_count(1)


# -- Continue ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_continue_after_a_length_cut_gives_one_message(open_scripted, scripted_backend, size):
    chat = open_scripted(size)
    chat.open_settings()
    chat.set_number("Max new tokens", 6)
    chat.ask("Please write code and a table")
    cut = chat.reply_text()
    expect(chat.bot_messages.last).to_contain_text("stopped at the length limit (6 new tokens)")

    chat.close_settings()  # open, they lie over the conversation
    chat.offered("Continue").click()
    expect(chat.stop_button).to_be_hidden()
    chat.open_settings()
    chat.set_number("Max new tokens", 400)
    chat.close_settings()
    chat.offered("Continue").click()  # a second cut goes on the same way
    expect(chat.bot_messages.last).not_to_contain_text("length limit")
    chat.wait_until_idle()

    expect(chat.bot_messages).to_have_count(1)  # one reply, grown in place
    expect(chat.figures).to_have_count(1)
    assert chat.reply_text().startswith(cut)
    assert " ".join(chat.reply_text().split()) == " ".join(SCRIPT["code and a table"].split())
    assert scripted_backend.prompts[-1].startswith(
        "User: Please write code and a table\nFalcon: Here is the code:"
    )


# -- export --------------------------------------------------------------------------------------


def test_exported_files_are_named_after_the_chat_and_its_time_and_stay_with_it(open_scripted):
    chat = open_scripted("desktop")
    chat.ask("Plan a trip to Lisbon")
    chat.page.get_by_role("button", name=EXPORT).click()
    files = chat.page.locator("#export-files")
    stamp = r"\d{4}-\d\d-\d\d-\d{4}"
    markdown_name = re.compile(rf"falcon-chat-plan-a-trip-to-lisbon-{stamp}\.md")
    expect(files.get_by_role("cell", name=markdown_name)).to_be_visible()
    expect(
        files.get_by_role("cell", name=re.compile(rf"falcon-chat-plan-a-trip-to-lisbon-{stamp}\.json"))
    ).to_be_visible()
    with chat.page.expect_download() as download:
        files.get_by_role("row", name=markdown_name).get_by_role("link").click()
    assert markdown_name.fullmatch(download.value.suggested_filename), download.value.suggested_filename
    markdown = Path(download.value.path()).read_text(encoding="utf-8")
    assert "**User:** Plan a trip to Lisbon" in markdown

    chat.new_chat()  # another chat's files are never offered
    expect(files).to_be_hidden()
    chat.ask("Another chat")
    chat.open_saved_chat("Plan a trip to Lisbon")
    expect(files).to_be_hidden()

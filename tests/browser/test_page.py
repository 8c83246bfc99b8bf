"""The page as a new user meets it (issue #13), at desktop (1366x900) and phone (390x844) sizes,
light and dark where it matters, against a scripted model that writes wide code, tables and math."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from chat.web.chat_events import SETTINGS_STORAGE_KEY
from chat.web.page import EXAMPLES
from tests.browser.chat_page import ChatPage
from tests.browser.conftest import MAX_MESSAGE_CHARS, SCRIPT, SERVER_BACK, SIZES, close_with_storage_cleared

pytestmark = pytest.mark.browser

BOTH = ["desktop", "phone"]
PAGE_WIDTH = "() => [document.documentElement.scrollWidth, window.innerWidth]"
CONTAINER_WIDTH = "() => document.querySelector('.gradio-container').getBoundingClientRect().width"


def inside_window(page, locator) -> bool:
    """The element is wholly on screen, without scrolling sideways."""
    box, window = locator.bounding_box(), page.viewport_size
    return (
        box is not None
        and box["x"] >= 0
        and box["x"] + box["width"] <= window["width"]
        and box["y"] + box["height"] <= window["height"]
    )


@pytest.mark.parametrize("size", BOTH)
def test_refused_messages_leave_the_chat_usable_and_the_next_one_gets_a_reply(open_scripted, size):
    chat = open_scripted(size)

    chat.textbox.press("Enter")  # an empty Enter does nothing at all
    too_long = "x" * (MAX_MESSAGE_CHARS + 1)
    chat.send(too_long)
    expect(chat.page.locator("#message").get_by_text(f"the limit is {MAX_MESSAGE_CHARS}")).to_be_visible()
    expect(chat.textbox).to_have_value(too_long)  # the typed text stays to be shortened
    expect(chat.textbox).to_be_editable()
    expect(chat.user_messages).to_have_count(0)

    chat.open_settings()
    chat.set_seed("lucky")
    chat.send("Hello")
    expect(chat.bot_messages.last).to_contain_text("The seed must be a whole number")
    expect(chat.textbox).to_be_editable()
    expect(chat.user_messages.last).to_have_attribute("aria-label", "user's message: Hello")
    expect(chat.textbox).to_have_value("")  # not back in the box: Enter would send it twice

    chat.set_seed("")
    chat.close_settings()  # open, they lie over the conversation
    chat.offered("Retry").click()  # the refused turn is asked again, not added again
    expect(chat.figures).to_have_count(1)
    assert chat.reply_text() == "A short reply."
    expect(chat.user_messages).to_have_count(1)
    expect(chat.page.get_by_text("Error", exact=True)).to_have_count(0)


def test_a_reply_the_server_could_not_give_offers_retry_instead_of_a_second_copy(
    open_scripted, scripted_backend
):
    """A server that cannot be reached gives a note, the request's figures and Retry; the message
    stays once in the chat and is not put back in the box (Enter there sent it twice)."""
    chat = open_scripted("phone")
    message = f"Hello, is the {SERVER_BACK}?"
    chat.send(message)
    expect(chat.bot_messages.last).to_contain_text("could not be reached")
    expect(chat.figures).to_have_count(1)
    chat.wait_until_idle()
    expect(chat.textbox).to_have_value("")
    expect(chat.page.get_by_text("connection refused")).to_have_count(0)

    chat.offered("Retry").click()
    expect(chat.bot_messages.last).to_contain_text("A short reply.")
    chat.wait_until_idle()
    expect(chat.user_messages).to_have_count(1)
    expect(chat.figures).to_have_count(1)
    assert scripted_backend.prompts[-1] == scripted_backend.prompts[-2] == f"User: {message}\nFalcon:"


@pytest.mark.parametrize("size, theme", [("phone", "light"), ("phone", "dark"), ("desktop", "dark")])
def test_wide_code_and_tables_scroll_inside_their_block_not_the_page(open_scripted, size, theme):
    chat = open_scripted(size, theme)
    chat.ask("Please write code and a table")

    width, window = chat.page.evaluate(PAGE_WIDTH)
    assert width == window, (width, window)
    code = chat.bot_messages.last.locator("pre").first
    assert code.evaluate("e => e.scrollWidth > e.clientWidth")  # it scrolls inside itself
    assert inside_window(chat.page, chat.submit_button)
    table = chat.bot_messages.last.locator("table").first
    assert table.evaluate("e => e.getBoundingClientRect().right") <= SIZES[size]["width"]


def test_at_every_phone_width_the_page_never_scrolls_sideways(open_scripted):
    chat = open_scripted("phone")
    chat.ask("Please write code and a table")
    for width in (320, 360, 430):
        chat.page.set_viewport_size({"width": width, "height": 800})
        assert chat.page.evaluate(PAGE_WIDTH) == [width, width]
        assert inside_window(chat.page, chat.submit_button)


@pytest.mark.parametrize("size", BOTH)
def test_the_page_opens_at_its_top_with_settings_closed_and_the_chat_filling_the_window(open_scripted, size):
    chat = open_scripted(size)
    page = chat.page
    expect(page.locator("#banner svg")).to_be_in_viewport()
    assert page.evaluate("() => window.scrollY") == 0
    expect(page.get_by_label("number input for Max new tokens").filter(visible=True)).to_have_count(0)
    height = page.locator("#conversation").bounding_box()["height"]
    assert height >= 0.4 * page.viewport_size["height"], height
    # One scroll: the page itself is no taller than the window (the conversation scrolls).
    assert page.evaluate("() => document.documentElement.scrollHeight") <= page.viewport_size["height"] + 4
    if size == "desktop":
        expect(chat.textbox).to_be_focused()


def test_the_layout_width_stays_put_whatever_the_content(open_scripted):
    chat = open_scripted("desktop")
    empty = chat.page.evaluate(CONTAINER_WIDTH)
    chat.ask("Hi")
    short = chat.page.evaluate(CONTAINER_WIDTH)
    chat.ask("Please write code and a table")
    wide = chat.page.evaluate(CONTAINER_WIDTH)
    chat.page.get_by_role("tab", name="Completion").click()
    completion = chat.page.evaluate(CONTAINER_WIDTH)
    assert empty == short == wide == completion == 1240, (empty, short, wide, completion)


@pytest.mark.parametrize("size", BOTH)
def test_a_reload_restores_the_system_prompt_and_settings(open_scripted, scripted_backend, size):
    chat = open_scripted(size)
    chat.open_settings()
    chat.set_system_prompt("You are a pirate.")
    chat.set_number("Max new tokens", 3)
    chat.ask("Ahoy")

    chat.page.reload()
    expect(chat.textbox).to_be_editable()
    chat.open_settings()
    expect(chat.page.get_by_label("System prompt", exact=True).filter(visible=True)).to_have_value(
        "You are a pirate."
    )
    expect(chat.page.get_by_label("number input for Max new tokens").filter(visible=True)).to_have_value("3")
    chat.ask("Where is the treasure?")
    assert scripted_backend.prompts[-1].startswith("System: You are a pirate.")


def test_a_setting_typed_while_the_page_still_loads_is_kept(sized_contexts, scripted_url):
    """The page's answers to its own load (held here, as a slow network holds them) came back
    after a person had typed a setting, and put the slider back to its default: the saved
    settings are restored in the page itself, before anything can be typed. Saved values of the
    wrong kind or out of range leave their input as it is."""
    page = sized_contexts("desktop").new_page()
    held = []
    page.route("**/gradio_api/run/predict", lambda route: held.append(route))  # answered once released below
    try:
        chat = ChatPage(page, scripted_url).open()
        chat.open_settings()
        chat.set_number("Max new tokens", 4000)
        for route in held:
            with page.expect_response(route.request.url):
                route.continue_()
        page.unroute("**/gradio_api/run/predict")
        chat.ask("Hi")  # long after the load's answers
        expect(chat._visible_label("range slider for Max new tokens")).to_have_value("4000")

        page.evaluate(
            "(key) => localStorage.setItem(key, JSON.stringify(['x'.repeat(20001), 0.5, 5000, 'one', 7, 42]))",
            SETTINGS_STORAGE_KEY,
        )
        page.reload()
        chat.open_settings()
        expect(chat._visible_label("System prompt")).to_have_value("")
        expect(chat._visible_label("number input for Temperature")).to_have_value("0.5")
        expect(chat._visible_label("number input for Max new tokens")).to_have_value("1024")
        expect(chat._visible_label("number input for Top-p")).to_have_value("0.9")
        expect(chat._visible_label("number input for Repetition penalty")).to_have_value("1")
        expect(page.get_by_role("textbox", name=re.compile(r"^Seed")).filter(visible=True)).to_have_value("")
    finally:
        close_with_storage_cleared(page)


@pytest.mark.parametrize("size", BOTH)
def test_figures_are_beside_the_reply_not_in_its_text(open_scripted, size):
    chat = open_scripted(size)
    reply = chat.ask("Hi")
    label = chat.bot_messages.last.get_attribute("aria-label")
    assert label == f"bot's message: {reply}" and "tokens" not in label and "<sub>" not in label
    figures = chat.figures.last
    expect(figures).to_contain_text("tokens")
    expect(figures).to_contain_text("end of turn")
    box = figures.bounding_box()
    assert box["height"] < 80, box  # no more than two short lines, even on a phone


@pytest.mark.parametrize("size", BOTH)
def test_keyboard_only_type_enter_escape_type_again(open_scripted, size):
    chat = open_scripted(size)
    page = chat.page
    chat.textbox.focus()
    page.keyboard.type("Please keep talking")
    page.keyboard.press("Enter")
    expect(chat.stop_button).to_be_visible()
    expect(chat.bot_messages).to_have_count(1)
    page.keyboard.type("Hi")  # the next message, typed while the reply streams...
    page.keyboard.press("Enter")  # ...waits in the box: one reply at a time
    expect(chat.textbox).to_have_value("Hi")
    expect(chat.user_messages).to_have_count(1)

    page.keyboard.press("Escape")
    chat.wait_until_idle()
    expect(chat.figures.last).to_contain_text("stopped by user")
    expect(chat.bot_messages.last).to_contain_text("Stopped.")
    expect(chat.textbox).to_be_focused()  # the focus is back in the box, the text still there
    expect(chat.textbox).to_have_value("Hi")
    page.keyboard.press("Enter")
    expect(chat.figures).to_have_count(2)  # the stopped reply keeps its figures
    assert chat.reply_text() == "A short reply."
    expect(chat.textbox).to_have_value("")


def test_buttons_have_names_and_nothing_covers_or_misleads(open_scripted):
    chat = open_scripted("desktop")
    page = chat.page
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    chat.ask("Hi")
    expect(page.get_by_role("button", name="Delete chat", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("share", re.I))).to_have_count(0)
    expect(page.get_by_text("Chatbot", exact=True)).to_have_count(0)  # no floating label
    clear = page.get_by_role("button", name="Delete chat", exact=True).bounding_box()
    first = chat.user_messages.first.bounding_box()
    assert clear["y"] + clear["height"] <= first["y"], (clear, first)  # nothing covers the text
    unnamed = page.evaluate(
        "() => [...document.querySelectorAll('button')].filter(b => b.offsetParent &&"
        " !(b.getAttribute('aria-label') || b.innerText.trim() || b.title)).map(b => b.outerHTML)"
    )
    assert unnamed == []


def test_the_trash_button_asks_before_it_deletes_the_chat(open_scripted):
    chat = open_scripted("desktop")
    chat.ask("Keep this chat")
    answers = iter([False, True])
    chat.page.on("dialog", lambda dialog: dialog.accept() if next(answers) else dialog.dismiss())

    chat.page.get_by_role("button", name="Delete chat", exact=True).click()
    expect(chat.user_messages).to_have_count(1)  # dismissed: kept
    expect(chat.saved_chat("Keep this chat")).to_be_visible()
    chat.page.get_by_role("button", name="Delete chat", exact=True).click()
    expect(chat.user_messages).to_have_count(0)


def test_inline_math_renders_prices_stay_text_and_the_model_gets_back_what_it_wrote(
    open_scripted, scripted_backend, screenshots
):
    chat = open_scripted("desktop")
    chat.ask("Some math please")
    message = chat.bot_messages.last
    expect(message.locator(".katex")).to_have_count(2)
    expect(message).to_contain_text("Between $5 and $10.")
    chat.page.screenshot(path=str(screenshots / "math-desktop.png"))

    chat.ask("And then?")  # the history comes back from the page
    prompt = scripted_backend.prompts[-1]
    assert f"User: Some math please\nFalcon: {SCRIPT['math']}\nUser: And then?" in prompt, prompt
    assert "tokens" not in prompt  # nor do the figures


def test_indented_code_shows_as_code_and_comes_back_as_written(open_scripted, scripted_backend, screenshots):
    """Markdown's indented code blocks, in a message and in a reply, whose lines after the first
    are all indented (Gradio's Chatbot used to take that shared indentation away)."""
    chat = open_scripted("desktop")
    question = "What is wrong with this indented code?\n\n    for n in numbers:\n        total += n"
    chat.ask(question)
    expect(chat.user_messages.last.locator("pre")).to_contain_text("for n in numbers:")
    expect(chat.bot_messages.last.locator("pre")).to_contain_text("total = 0")
    chat.page.screenshot(path=str(screenshots / "indented-code-desktop.png"))

    chat.ask("And then?")  # the history comes back from the page
    prompt = scripted_backend.prompts[-1]
    assert f"User: {question}\nFalcon: {SCRIPT['indented code']}\nUser: And then?" in prompt, prompt


def test_copy_conversation_gives_the_turns_as_the_model_wrote_them(open_scripted, screenshots):
    chat = open_scripted("desktop")
    chat.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    chat.ask("Some math please")
    chat.page.get_by_role("button", name="Copy message").last.click()  # the reply's own
    copied = chat.page.evaluate("() => navigator.clipboard.readText()")
    assert copied == SCRIPT["math"], repr(copied)

    # A stopped reply is copied with its note.
    chat.send("Please keep talking")
    expect(chat.bot_messages).to_have_count(2)
    chat.stop()
    expect(chat.figures).to_have_count(2)
    chat.wait_until_idle()

    chat.page.get_by_role("button", name="Copy conversation").click()
    copied = chat.page.evaluate("() => navigator.clipboard.readText()")
    chat.page.screenshot(path=str(screenshots / "copied-desktop.png"))
    turns = (
        r"user: Some math please\n\nassistant: " + re.escape(SCRIPT["math"]) + r"\n\n"
        r"user: Please keep talking\n\nassistant: and[a-z ]*\n\n> ⚠️ Stopped\."  # cut anywhere
    )
    assert re.fullmatch(turns, copied), copied


def test_a_reply_stopped_before_its_first_word_says_so(open_scripted, scripted_backend):
    """Stopped while the server had not yet answered (THINK_S here): the message gets a reply
    that is only the note, with its figures, instead of hanging unanswered; and it stays out of
    the next prompt."""
    chat = open_scripted("desktop")
    chat.ask("Hi")
    chat.send("Please think first")
    expect(chat.stop_button).to_be_visible()
    chat.stop()
    expect(chat.bot_messages).to_have_count(2)
    expect(chat.bot_messages.last).to_contain_text("Stopped.")
    expect(chat.figures.last).to_contain_text("stopped by user")
    chat.ask("Next")
    assert scripted_backend.prompts[-1] == "User: Hi\nFalcon: A short reply.\nUser: Next\nFalcon:"


@pytest.mark.parametrize("send", ["Enter", "Send clicked twice"])
def test_a_message_sent_the_moment_after_stop_leaves_the_stopped_reply_whole(
    open_scripted, scripted_backend, send
):
    """The stopped reply gets its note and figures once its stream has ended (here up to 0.8 s
    after Stop); the next message, typed while the reply streamed and sent at once after
    Stop, starts from that conversation instead of replacing it, and is sent once."""
    chat = open_scripted("desktop")
    chat.send("Please answer slowly")
    expect(chat.bot_messages.last).to_contain_text("word after")
    chat.textbox.fill("And now, briefly?")
    chat.stop()
    prompts = len(scripted_backend.prompts)
    if send == "Enter":
        chat.textbox.press("Enter")
    else:
        chat.submit_button.click()
        chat.submit_button.click()
    expect(chat.bot_messages).to_have_count(2)
    expect(chat.bot_messages.last).to_contain_text("A short reply.")
    chat.wait_until_idle()
    expect(chat.bot_messages.first).to_contain_text("Stopped.")
    expect(chat.figures).to_have_count(2)
    expect(chat.user_messages).to_have_count(2)
    assert "User: Please answer slowly\nFalcon: word after" in scripted_backend.prompts[-1]
    assert len(scripted_backend.prompts) == prompts + 1


def test_undo_edit_or_another_chat_right_after_stop_waits_for_the_stopped_reply(
    open_scripted, scripted_backend
):
    """Undo, Edit, Retry or a saved chat, clicked while a stopped reply is being finished (here up
    to 0.8 s after Stop), take effect once it is: sooner, the finished reply was put back over
    what they did (an undone message back, an edit lost, another saved chat replaced by this
    conversation and then saved over)."""
    chat = open_scripted("desktop")
    page = chat.page
    chat.ask("The first chat")
    chat.new_chat()
    chat.send("Please answer slowly")
    expect(chat.bot_messages.last).to_contain_text("word after")
    chat.stop()
    page.get_by_role("button", name="Undo").click()
    expect(chat.textbox).to_have_value("Please answer slowly")
    expect(chat.user_messages).to_have_count(0)
    chat.ask("Something else")  # sent once the stopped reply is finished, and undone
    assert scripted_backend.prompts[-1] == "User: Something else\nFalcon:"
    expect(chat.user_messages).to_have_count(1)

    chat.send("Please answer slowly")
    expect(chat.bot_messages.last).to_contain_text("word after")
    chat.stop()
    chat.open_saved_chat("The first chat")
    expect(chat.user_messages.first).to_have_attribute("aria-label", "user's message: The first chat")
    chat.ask("And then?")
    assert scripted_backend.prompts[-1].startswith(
        "User: The first chat\nFalcon: A short reply.\nUser: And then?"
    )
    expect(chat.user_messages).to_have_count(2)
    expect(chat.figures).to_have_count(2)


def test_new_chat_or_another_chat_during_a_reply_stops_it_and_keeps_both_chats(
    open_scripted, scripted_backend
):
    """New chat (or another saved chat) while a reply streams stops the reply, which is saved with
    its note and figures, and opens the other chat: before, the still-streaming reply drew its
    conversation back over the new chat, and was then saved in its place."""
    chat = open_scripted("phone")
    page = chat.page
    chat.ask("The first chat")
    chat.send("Please keep talking")
    expect(chat.bot_messages.last).to_contain_text("and on")
    chat.show_saved_chats()
    page.locator("#new-chat").click()
    chat.wait_until_idle()
    expect(chat.user_messages).to_have_count(0)
    chat.ask("A new chat")
    assert scripted_backend.prompts[-1] == "User: A new chat\nFalcon:"

    chat.send("Please keep talking")
    expect(chat.bot_messages.last).to_contain_text("and on")
    chat.open_saved_chat("The first chat")
    chat.wait_until_idle()
    expect(chat.user_messages).to_have_count(2)
    expect(chat.bot_messages.last).to_contain_text("Stopped.")  # saved stopped, with its figures
    expect(chat.figures).to_have_count(2)
    chat.open_saved_chat("A new chat")
    expect(chat.user_messages).to_have_count(2)
    expect(chat.bot_messages.last).to_contain_text("Stopped.")
    expect(chat.figures).to_have_count(2)


def test_a_chat_emptied_by_undo_leaves_the_saved_chats_and_the_others_still_open(open_scripted):
    """Undo of a chat's only message emptied it in the saved chats; the list hides empty chats, so
    every chat below it opened the one above it (here: the empty one)."""
    chat = open_scripted("desktop")
    page = chat.page
    chat.ask("Chat A")
    chat.new_chat()
    chat.ask("Chat B")
    page.get_by_role("button", name="Undo").click()
    expect(chat.saved_chat("Chat B")).to_have_count(0)
    chat.open_saved_chat("Chat A")
    expect(chat.user_messages).to_have_count(1)
    expect(chat.user_messages.first).to_have_attribute("aria-label", "user's message: Chat A")


def test_the_reply_to_an_edited_message_can_be_stopped_and_the_chat_goes_on(open_scripted, scripted_backend):
    """An edited message's reply streams with Stop shown (and Escape stops it) as any reply
    does: it had no Stop, so a long reply ran to its end with the message box disabled."""
    chat = open_scripted("desktop")
    page = chat.page
    chat.ask("Hi")
    chat.user_messages.last.hover()
    page.get_by_role("button", name="Edit").click()
    page.locator(".message textarea").last.fill("Please answer slowly")
    page.get_by_role("button", name="Submit").click()
    expect(chat.bot_messages.last).to_contain_text("word after")
    expect(chat.stop_button).to_be_visible()
    expect(chat.textbox).to_be_editable()  # the next message can be typed meanwhile
    page.keyboard.press("Escape")
    expect(chat.bot_messages.last).to_contain_text("Stopped.")
    expect(chat.figures).to_have_count(1)
    chat.wait_until_idle()
    expect(chat.textbox).to_be_focused()
    chat.ask("And then?")
    assert "User: Please answer slowly\nFalcon: word after" in scripted_backend.prompts[-1]
    assert "Stopped" not in scripted_backend.prompts[-1]
    expect(chat.figures).to_have_count(2)


@pytest.mark.parametrize("size", BOTH)
def test_an_example_undo_or_new_chat_leaves_the_focus_in_the_box_so_enter_sends(
    open_scripted, scripted_backend, size
):
    """An example (or Undo) fills the box to be edited and sent: the focus goes there (it stayed
    on the button, so Enter chose the example again, or did nothing), as it does after New chat."""
    chat = open_scripted(size)
    chat.page.get_by_role("button", name="Select example 3").click()
    expect(chat.textbox).to_have_value(EXAMPLES[2])
    expect(chat.textbox).to_be_focused()
    chat.page.keyboard.press("Enter")
    expect(chat.figures).to_have_count(1)
    assert scripted_backend.prompts[-1] == f"User: {EXAMPLES[2]}\nFalcon:"
    chat.wait_until_idle()
    chat.page.get_by_role("button", name="Undo").click()  # the message back in the box, to edit
    expect(chat.textbox).to_have_value(EXAMPLES[2])
    expect(chat.textbox).to_be_focused()
    chat.page.keyboard.press("Enter")
    expect(chat.figures).to_have_count(1)
    chat.wait_until_idle()
    chat.new_chat()
    expect(chat.textbox).to_be_focused()


def test_the_next_message_can_be_typed_while_a_retried_reply_streams(open_scripted, scripted_backend):
    """As during any reply, the box stays editable while a retried reply streams (it was
    disabled), and what was typed there is sent after it."""
    chat = open_scripted("desktop")
    chat.send("Please answer slowly")
    expect(chat.bot_messages.last).to_contain_text("word after")
    chat.stop()
    expect(chat.bot_messages.last).to_contain_text("Stopped.")
    chat.wait_until_idle()
    chat.page.get_by_role("button", name="Retry").click()
    expect(chat.stop_button).to_be_visible()
    expect(chat.textbox).to_be_editable()
    chat.textbox.fill("Then briefly")
    chat.stop()
    chat.textbox.press("Enter")
    expect(chat.figures).to_have_count(2)
    expect(chat.bot_messages.last).to_contain_text("A short reply.")
    assert scripted_backend.prompts[-1].endswith("User: Then briefly\nFalcon:")


@pytest.mark.parametrize("size", BOTH)
def test_the_page_names_the_model_it_talks_to(open_scripted, size):
    chat = open_scripted(size)
    banner = chat.page.locator("#banner")
    expect(banner).to_contain_text("falcon-7b-instruct")
    expect(banner).not_to_contain_text("180B")
    expect(chat.page.get_by_text("Chatting with")).to_contain_text("falcon-7b-instruct")
    expect(chat.page.get_by_text("/models/")).to_have_count(0)

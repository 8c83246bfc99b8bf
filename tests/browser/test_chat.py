"""What a person does on the chat page, in headless Chromium, against the real app on the tiny
offline Falcon (its decode loop recorded, so a test can see what the model itself did)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from chat.conversation.backend import FINISH_CANCELLED
from chat.conversation.params import GenerationParams
from chat.conversation.reply import stream_reply
from tests.browser.chat_page import ChatPage

pytestmark = pytest.mark.browser

# The mean of red, green and blue of the first opaque background behind the chat (0 to 255).
PAGE_BRIGHTNESS = """() => {
  for (let e = document.querySelector('.gradio-container'); e; e = e.parentElement) {
    const [r, g, b, a] = getComputedStyle(e).backgroundColor.match(/[0-9.]+/g).map(Number);
    if (a === undefined || a > 0) return (r + g + b) / 3;
  }
  return 255;  // nothing painted: the browser's white canvas
}"""
LONGEST_REPLY = 2000  # tokens
# The tiny model's greedy reply to this runs on to LONGEST_REPLY tokens without ending its turn.
LONG_WINDED_MESSAGE = "Please keep talking"


def greedy_reply(backend, message: str, *, system_prompt: str = "", max_new_tokens: int) -> str:
    """The reply the model gives at temperature 0, asked directly (not through the page)."""
    params = GenerationParams(temperature=0.0, max_new_tokens=max_new_tokens)
    texts = stream_reply(backend, message, [], system_prompt, params, max_message_chars=20_000)
    return list(texts)[-1]  # each value is the whole reply so far


def words(text: str) -> str:
    """The text with its whitespace evened out: Gradio's Chatbot dedents every text message
    (`inspect.cleandoc` in gradio/components/chatbot.py), so spaces after line breaks vary."""
    return " ".join(text.split())


def test_the_page_loads_with_its_title_banner_examples_and_an_empty_chat(chat):
    page = chat.page
    expect(page).to_have_title("Falcon Chat")
    expect(page.locator("#banner svg")).to_be_visible()
    expect(page.get_by_text("Chatting with")).to_contain_text("tiny demo Falcon")
    expect(page.get_by_text("its replies are gibberish")).to_be_visible()
    expect(page.get_by_role("button", name="Select example 1")).to_be_visible()
    expect(chat.bot_messages).to_have_count(0)
    expect(chat.textbox).to_be_editable()


def test_a_reply_streams_in_token_by_token(chat, local_backend, real_model_pace):
    chat.open_settings()
    chat.set_number("Temperature", 0)
    chat.set_number("Max new tokens", 60)
    chat.watch_reply_growth()

    chat.send("Hello")
    expect(chat.user_messages.last).to_have_attribute("aria-label", "user's message: Hello")
    chat.wait_until_idle()

    lengths = chat.reply_lengths()
    final = chat.reply_text()
    assert words(final) == words(greedy_reply(local_backend, "Hello", max_new_tokens=60))
    # The text grew through many states on the way, starting from a small part of the reply.
    assert len(lengths) >= 5, lengths
    assert lengths == sorted(lengths), lengths
    assert lengths[0] < len(final) / 2, lengths


def test_stop_halts_the_reply_and_the_generation(chat, real_model_pace):
    chat.open_settings()
    chat.set_number("Temperature", 0)  # greedy: this reply would run to LONGEST_REPLY tokens
    chat.set_number("Max new tokens", LONGEST_REPLY)
    started = chat.recorder.count()

    chat.send(LONG_WINDED_MESSAGE)
    expect(chat.bot_messages).to_have_count(1)
    chat.page.wait_for_function(
        "() => { const b = document.querySelector('[data-testid=bot]'); return b && b.innerText.length >= 20; }"
    )
    chat.stop()
    chat.wait_until_idle()

    generation = chat.recorder.ended_generation(started, timeout=10)
    assert generation.finish_reason == FINISH_CANCELLED, (
        "the reply ended before Stop: see LONG_WINDED_MESSAGE"
    )
    assert 0 < generation.tokens < LONGEST_REPLY
    shown = chat.reply_text()
    # What the page shows stopped with the model: the start of the reply, no more than it made.
    assert len(shown) >= 20
    assert words(chat.recorder.text(generation)).startswith(words(shown))
    expect(chat.textbox).to_be_editable()
    assert chat.reply_text() == shown


def test_temperature_zero_gives_the_greedy_reply_and_max_new_tokens_its_length(chat, local_backend):
    chat.open_settings()
    chat.set_number("Temperature", 0)
    chat.set_number("Max new tokens", 7)
    started = chat.recorder.count()

    reply = chat.ask("Write a haiku about the sea")

    generation = chat.recorder.ended_generation(started)
    assert generation.params.temperature == 0 and generation.params.max_new_tokens == 7
    assert generation.tokens == 7
    assert words(reply) == words(greedy_reply(local_backend, "Write a haiku about the sea", max_new_tokens=7))


def test_the_system_prompt_goes_to_the_model(chat, local_backend):
    chat.open_settings()
    chat.set_system_prompt("You are a pirate. Answer in one line.")
    chat.set_number("Temperature", 0)
    chat.set_number("Max new tokens", 5)
    started = chat.recorder.count()

    reply = chat.ask("Where is the treasure?")

    generation = chat.recorder.ended_generation(started)
    assert generation.prompt.startswith(
        "System: You are a pirate. Answer in one line.\nUser: Where is the treasure?"
    )
    assert words(reply) == words(
        greedy_reply(
            local_backend,
            "Where is the treasure?",
            system_prompt="You are a pirate. Answer in one line.",
            max_new_tokens=5,
        )
    )


def test_retry_asks_the_model_again_with_the_same_prompt(chat):
    chat.open_settings()
    chat.set_number("Max new tokens", 12)
    first = chat.recorder.count()
    chat.ask("Tell me about falcons")

    chat.page.get_by_role("button", name="Retry").click()

    retried = chat.recorder.ended_generation(first + 1)
    assert retried.prompt == chat.recorder.generations[first].prompt
    chat.wait_until_idle()
    expect(chat.user_messages).to_have_count(1)
    expect(chat.bot_messages).to_have_count(1)


def test_editing_a_message_replaces_it_and_its_reply(chat):
    chat.open_settings()
    chat.set_number("Max new tokens", 8)
    first = chat.recorder.count()
    chat.ask("What is the capital of Franse?")

    chat.user_messages.last.hover()
    chat.page.get_by_role("button", name="Edit").click()
    editor = chat.page.locator(".message textarea").last
    editor.fill("What is the capital of France?")
    chat.page.get_by_role("button", name="Submit").click()

    edited = chat.recorder.ended_generation(first + 1)
    assert "User: What is the capital of France?\nFalcon:" in edited.prompt
    assert "Franse" not in edited.prompt
    chat.wait_until_idle()
    expect(chat.user_messages).to_have_count(1)
    expect(chat.user_messages.last).to_have_attribute(
        "aria-label", "user's message: What is the capital of France?"
    )
    expect(chat.bot_messages).to_have_count(1)


def test_continue_after_a_length_cut_resumes_the_same_reply_in_the_model(chat):
    """The real model, cut at 8 tokens, goes on from where it stopped: its prompt ends inside the
    reply, and the page shows one reply, grown."""
    chat.open_settings()
    chat.set_number("Temperature", 0)
    chat.set_number("Max new tokens", 8)
    first = chat.recorder.count()
    cut = chat.ask("Tell me about falcons")
    expect(chat.bot_messages.last).to_contain_text("length limit")

    chat.close_settings()  # open, they lie over the conversation
    chat.offered("Continue").click()
    continued = chat.recorder.ended_generation(first + 1)
    chat.wait_until_idle()

    assert continued.prompt.startswith("User: Tell me about falcons\nFalcon: ")
    assert continued.prompt.endswith(cut.rstrip())  # the prompt ends inside the reply
    expect(chat.bot_messages).to_have_count(1)
    expect(chat.figures).to_have_count(1)
    grown = chat.reply_text()
    assert grown.startswith(cut.rstrip()) and len(grown) > len(cut)
    assert words(grown) == words(cut.rstrip() + chat.recorder.text(continued))


def test_an_example_fills_the_box_to_be_edited_before_it_is_sent(chat):
    example = "Write a haiku about a falcon over the city at dawn."
    started = chat.recorder.count()

    chat.page.get_by_role("button", name=f"Select example 3: {example}").click()

    expect(chat.textbox).to_have_value(example)
    expect(chat.user_messages).to_have_count(0)  # nothing is sent, nothing generated yet
    assert chat.recorder.count() == started
    chat.textbox.press("Enter")
    expect(chat.user_messages).to_have_count(1)
    expect(chat.user_messages.last).to_have_attribute("aria-label", f"user's message: {example}")
    expect(chat.bot_messages).to_have_count(1)
    assert f"User: {example}\nFalcon:" in chat.recorder.ended_generation(started).prompt
    chat.wait_until_idle()


def test_a_long_conversation_keeps_every_turn_in_order_and_in_the_prompt(chat):
    chat.open_settings()
    chat.set_number("Temperature", 0)
    chat.set_number("Max new tokens", 4)
    messages = [f"Question number {n}: what comes next?" for n in range(1, 9)]
    started = chat.recorder.count()

    replies = [chat.ask(message) for message in messages]

    expect(chat.user_messages).to_have_count(len(messages))
    expect(chat.bot_messages).to_have_count(len(messages))
    for index, message in enumerate(messages):
        expect(chat.user_messages.nth(index)).to_have_attribute("aria-label", f"user's message: {message}")
    # The newest reply is scrolled into view, and the model saw the whole conversation.
    expect(chat.bot_messages.last).to_be_in_viewport()
    last_prompt = chat.recorder.ended_generation(started + len(messages) - 1).prompt
    positions = [last_prompt.index(f"User: {message}\nFalcon:") for message in messages]
    assert positions == sorted(positions)
    assert f"Falcon: {replies[0]}" in last_prompt


def test_at_the_most_new_tokens_a_2048_token_model_still_sees_the_first_turn(chat, real_model_pace):
    """Max new tokens at its maximum (the tiny model's whole context, 2,048) once reserved all of
    it for the reply and dropped every turn: "What is my name?" no longer saw "My name is Ada".
    The conversation comes first now, and the reply gets what is left."""
    chat.open_settings()
    chat.set_number("Max new tokens", 2048)
    chat.close_settings()
    started = chat.recorder.count()
    for turn, message in enumerate(("My name is Ada.", "What is my name?")):
        chat.send(message)
        chat.recorder.started_generation(started + turn)
        expect(chat.bot_messages).to_have_count(turn + 1)  # its first words are shown
        chat.stop()  # the prompt is what counts here, not 2,000 tokens of the tiny model
        chat.wait_until_idle()

    asked = chat.recorder.ended_generation(started + 1)
    assert "User: My name is Ada.\nFalcon:" in asked.prompt
    assert asked.prompt.rstrip().endswith("User: What is my name?\nFalcon:")
    assert 0 < asked.params.max_new_tokens < 2048  # what the context left, not what was asked
    expect(chat.figures.last).not_to_contain_text("left out")


def test_a_reload_keeps_the_conversation(chat):
    chat.open_settings()
    chat.set_number("Max new tokens", 6)
    reply = chat.ask("Remember this conversation")
    expect(chat.saved_chat("Remember this conversation")).to_be_visible()  # listed among the saved chats
    # Saved in the browser's own storage: the page is not framed, so the fallback stayed out.
    assert chat.page.evaluate("() => window.falconChatMemoryStorage === undefined")

    chat.page.reload()

    expect(chat.user_messages).to_have_count(1)  # the chat it was in, open again
    expect(chat.user_messages.last).to_have_attribute(
        "aria-label", "user's message: Remember this conversation"
    )
    assert chat.reply_text() == reply


def test_a_backend_error_shows_a_readable_message_under_the_partial_reply(page, failing_url):
    chat = ChatPage(page, failing_url).open()

    chat.send("Hello")
    chat.wait_until_idle()

    expect(chat.bot_messages.last).to_contain_text("Partial reply")
    expect(chat.bot_messages.last).to_contain_text(
        "Reply cut short: The model failed while generating the reply. Please try again."
    )
    expect(chat.figures.last).to_contain_text("error")  # a failed reply has its figures too
    expect(page.get_by_text("Traceback")).to_have_count(0)
    expect(page.get_by_text("server went away")).to_have_count(0)  # the log's detail, not the page's
    expect(chat.textbox).to_be_editable()


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_screenshots_in_light_and_dark(page, chat_url, screenshots, theme):
    chat = ChatPage(page, chat_url).open(f"?__theme={theme}")
    chat.open_settings()
    chat.set_number("Max new tokens", 40)  # a reply that fits beside its question
    chat.close_settings()
    page.get_by_role("button", name="Select example 3").click()
    expect(chat.textbox).not_to_have_value("")
    chat.textbox.press("Enter")
    expect(chat.figures).to_have_count(1)
    chat.wait_until_idle()

    brightness = page.evaluate(PAGE_BRIGHTNESS)
    assert (brightness > 180) if theme == "light" else (brightness < 80), brightness
    page.screenshot(path=str(screenshots / f"chat-{theme}.png"), full_page=True)

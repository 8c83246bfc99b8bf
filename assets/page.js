/* Falcon Chat: keyboard and focus on the chat page (the chats themselves: assets/chats.js).
   - Enter on an empty message box does nothing (Gradio would send it, and refuse it), nor while
     a reply streams (the next message can be typed meanwhile);
   - a message sent just after Stop waits until the stopped reply has its note and figures, and
     so does any other change to the conversation (Retry, Undo, Edit, Continue, a version, the
     trash, New chat, another saved chat); the trash, New chat or another saved chat during a
     reply stop it first;
   - Escape stops a streaming reply (as the Stop button does); in a message being edited, Enter
     sends the edit, Shift+Enter adds a line, Escape cancels it;
   - the message box gets the focus back after each reply, an example, Undo or New chat, without
     scrolling the page;
   - the trash button asks before it deletes the open chat from the saved chats;
   - what is copied is the model's own text: without the marks on inline math, nor the figures;
     "Copy conversation" copies the user's and the model's turns only. */
(function () {
  "use strict";
  function messageBox() { return document.querySelector("#message textarea"); }
  function stopButton() {
    var button = document.querySelector("#message button.stop-button");
    return button && button.offsetParent !== null ? button : null;
  }
  function focusMessageBox() {
    var box = messageBox();
    if (box && !box.disabled && document.activeElement !== box) box.focus({ preventScroll: true });
  }

  // After Stop the server finishes the stopped reply (its "Stopped." note and figures:
  // chat/web/chat_events.py), and that finished reply replaces the shown one. So whatever changes the conversation meanwhile must wait for it: a message sent sooner
  // started from the conversation without them; an Undo, an Edit, a Retry, the trash, New chat or
  // another saved chat was undone by it (another saved chat was then saved over). Such a click
  // (or Enter) is held, and made again when the server's last step says it is done
  // (falconChat.stopSettled), or after SETTLE_MS at most; of several, the last one counts.
  // The trash, New chat or another saved chat clicked while a reply streams (the others are
  // disabled meanwhile) stop it first, and are held likewise: the running reply would otherwise
  // draw its conversation back over the other chat, and save it there.
  var SETTLE_MS = 6000;
  var SEND = "#message button.submit-button";
  // The toolbar's one icon button (the others are ours): its name follows the reader's language.
  var TRASH = "#conversation .top-panel button.icon-button";
  var FOCUS_AFTER = "#conversation button.example, #conversation button[aria-label='Undo'], #new-chat";
  var CHANGES_CONVERSATION = [
    SEND,
    "#conversation button[aria-label='Retry']",
    "#conversation button[aria-label='Undo']",
    "#conversation button[aria-label='Edit']",
    "#conversation button.option",
    "#conversation .falcon-versions button",
    TRASH,
    "#new-chat",
    "#saved-chats a.falcon-chat-link"
  ];
  var settling = null, held = null, replaying = false;
  function hold(selector, element) {
    // Buttons are drawn anew as the conversation changes: keep which one (its place), not it.
    held = { selector: selector, index: Array.prototype.indexOf.call(document.querySelectorAll(selector), element) };
  }
  function settled() {
    clearTimeout(settling);
    settling = null;
    var action = held;
    held = null;
    var target = action && document.querySelectorAll(action.selector)[action.index];
    if (!target || target.disabled) return;
    replaying = true;  // the click is made again as it was: not held, not asked again
    try { target.click(); } finally { replaying = false; }
  }
  function conversationChange(target) {
    for (var i = 0; i < CHANGES_CONVERSATION.length; i++) {
      var element = target.closest(CHANGES_CONVERSATION[i]);
      if (element) return { selector: CHANGES_CONVERSATION[i], element: element };
    }
    return null;
  }

  document.addEventListener("keydown", function (event) {
    var box = messageBox();
    // The box Gradio opens to edit a message, with its Submit and Cancel buttons (assets/chats.js).
    var editor = event.target && event.target.closest && event.target.closest("#conversation textarea.edit-textarea");
    if (editor && !event.isComposing && (event.key === "Escape" || (event.key === "Enter" && !event.shiftKey))) {
      var action = window.falconChat.editButton(editor, event.key === "Escape" ? "Cancel" : "Submit");
      event.preventDefault();
      event.stopImmediatePropagation();
      if (action && !(event.key === "Enter" && !editor.value.trim())) action.click();
    } else if (event.key === "Escape" && stopButton()) {
      event.preventDefault();
      stopButton().click();
    } else if (event.key === "Enter" && !event.shiftKey && event.target === box && (!box.value.trim() || stopButton() || settling)) {
      // Nothing to send, or a reply still streaming: the typed text waits in the box; or a
      // stopped reply still being finished: it is sent once that is done.
      event.preventDefault();
      event.stopImmediatePropagation();
      if (settling && !stopButton() && box.value.trim()) hold(SEND, document.querySelector(SEND));
    }
  }, true);

  document.addEventListener("click", function (event) {
    var target = event.target && event.target.closest ? event.target : null;
    if (!target) return;
    if (target.closest("#message button.stop-button")) {
      clearTimeout(settling);
      settling = setTimeout(window.falconChat.stopSettled, SETTLE_MS);  // calls settled() back
      window.falconChat.stopRequested();
      return;
    }
    // An example or Undo fills the box, New chat empties it: the next message is typed (and sent
    // with Enter) there, not on the button clicked.
    if (target.closest(FOCUS_AFTER)) setTimeout(focusMessageBox, 0);
    var change = !replaying && conversationChange(target);
    if (!change) return;
    if (change.selector === TRASH && !window.confirm("Delete this chat? It is removed from the saved chats too.")) {
      event.preventDefault();
      event.stopImmediatePropagation();
    } else if (settling || stopButton()) {
      event.preventDefault();
      event.stopImmediatePropagation();
      hold(change.selector, change.element);
      if (stopButton()) stopButton().click();
    }
  }, true);

  // When a reply ends: the focus back in the box, once it is editable again.
  function waitForBox(tries) {
    var box = messageBox();
    tries = tries || 0;
    if (box && !box.disabled) return focusMessageBox();
    if (tries < 50) setTimeout(function () { waitForBox(tries + 1); }, 50);
  }
  var streaming = false;
  new MutationObserver(function () {
    var now = stopButton() !== null;
    if (streaming && !now) waitForBox();
    streaming = now;
  }).observe(document.documentElement, { subtree: true, childList: true, attributes: true, attributeFilter: ["disabled", "class", "style"] });

  // What leaves the page by copying is the model's own text: the marks the server puts inside
  // the `$…$` it shows as math (chat/conversation/inline_math.py) are taken out, and so are the figures that
  // Gradio's "Copy message" adds after a reply (it copies a reply and its figures' message as
  // "<reply>\n<title>\n  \n"). Gradio copies through navigator.clipboard; its fallback and the
  // person's own selections go through the copy event.
  var MATH_MARKS = /\$\u2060|\u2060\$/g;
  var FIGURES_COPIED = /[ \n]\d+ tokens \u00b7 [^\n]*\n {2}\n$/;
  function written(text) { return String(text).replace(FIGURES_COPIED, "").replace(MATH_MARKS, "$"); }
  if (navigator.clipboard && navigator.clipboard.writeText) {
    var writeText = navigator.clipboard.writeText.bind(navigator.clipboard);
    navigator.clipboard.writeText = function (text) { return writeText(written(text)); };
  }
  document.addEventListener("copy", function (event) {
    var target = event.target, text;
    if (target && typeof target.selectionStart === "number" && target.value !== undefined) {
      text = target.value.slice(target.selectionStart, target.selectionEnd);
    } else {
      text = String(document.getSelection() || "");
    }
    if (text.indexOf("\u2060") === -1) return;
    event.clipboardData.setData("text/plain", written(text));
    event.preventDefault();
  }, true);

  // "Copy conversation": the user's and the model's turns, `role: text` as Gradio copies them,
  // without the messages that only show a reply's figures (their title is all they hold).
  function partsText(content) {
    if (typeof content === "string") return content;
    return (content || []).filter(function (part) { return part && part.type === "text"; })
      .map(function (part) { return part.text || ""; }).join("\n");
  }
  Object.assign(window.falconChat, {
    onStopSettled: settled,  // assets/chats.js, once a stopped reply has its note and figures
    copyConversation: function (history) {
      var turns = (history || []).filter(function (message) {
        return !(message.metadata && message.metadata.title);
      }).map(function (message) { return message.role + ": " + partsText(message.content); });
      navigator.clipboard.writeText(turns.join("\n\n"));
      var button = document.querySelector("#conversation .custom-button[aria-label='Copy conversation']");
      if (button) {  // a check mark for a moment, as Gradio's own copy buttons show
        button.classList.add("copied");
        setTimeout(function () { button.classList.remove("copied"); }, 1500);
      }
      return [];
    }
  });

  // Focus the box once the page is there, without the browser scrolling to it (phones).
  var tries = 0;
  (function focusWhenReady() {
    if (messageBox()) return focusMessageBox();
    if (++tries < 100) setTimeout(focusWhenReady, 100);
  })();
})();

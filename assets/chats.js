/* Falcon Chat: the chats, kept in this browser (how the page's events use this script:
   chat/web/chat_events.py).
   - Every chat is one entry in the browser's storage, "falcon-chat/<id>": a change writes that
     chat alone, and nothing of it is sent to the server to be kept. Two tabs that each add a chat
     keep both, and each tab's list shows the other's at once (the `storage` event). A restart of
     the server changes nothing here: the key is ours, not one Gradio makes at each start.
   - The open chat is in the address, "#chat=<id>": a reload reopens it, and a link or bookmark
     opens it. A reply that a reload interrupted is kept, marked as such, with Continue and Retry.
   - Retry and Edit keep what they replace as a version: "< 1/2 >" beside the message goes back.
   - The saved chats are listed newest first, can be searched and renamed.
   - A request carries the conversation, or its newest part where the whole would be larger than
     the server takes (the server only needs what fits the model's context).
   - The settings are kept under our own key too.
   Where the browser gives a framed page no storage, chat/web/embedding.py puts an in-memory one
   in its place: the chats then last as long as the page. */
(function () {
  "use strict";
  var PREFIX = "falcon-chat/";
  var SETTINGS_KEY = "falcon-chat-settings";
  var OPEN_KEY = "falcon-chat-open";  // the tab's open chat (sessionStorage), where the address has none
  var limits = window.falconChatLimits || { maxRequestBytes: 2097152 };
  // Room a request keeps for the settings (a system prompt of up to 20,000 characters), the
  // request's own fields and Gradio's.
  var REQUEST_MARGIN_BYTES = 256 * 1024;
  var SAVE_EVERY_MS = 300;  // while a reply streams, its chat is written at most this often
  var HEARTBEAT_MS = 2000;  // ...and at least this often, so other tabs know it is still coming
  var STALE_MS = 15000;  // a reply marked as coming, in another tab, longer ago than this has ended
  var TITLE_CHARS = 60;
  var NOTE_MARK = "> \u26a0\ufe0f ";
  var INTERRUPTED = "The page was reloaded before this reply ended.";
  var STORAGE_FULL = "This browser's storage for the app is full, so this chat is not saved: delete old chats to make room.";
  var NO_CHANGE = { __type__: "update" };

  function storage() {
    try { return window.localStorage; } catch (error) { return null; }
  }
  function tabStorage() {
    try { return window.sessionStorage; } catch (error) { return null; }
  }
  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }
  var tabId = (function () {
    var kept = tabStorage() && tabStorage().getItem("falcon-chat-tab");
    var id = kept || newId();
    try { tabStorage().setItem("falcon-chat-tab", id); } catch (error) { /* no storage: one page load */ }
    return id;
  })();

  // -- messages, in the shape Gradio's Chatbot keeps ---------------------------------------------
  function textOf(message) {
    var content = message && message.content;
    if (typeof content === "string") return content;
    return (content || []).filter(function (part) { return part && part.type === "text"; })
      .map(function (part) { return part.text || ""; }).join("\n");
  }
  function message(role, text, options) {
    return {
      role: role,
      content: [{ type: "text", text: text }],
      metadata: null,
      options: options && options.length ? options.map(function (o) { return { label: o, value: o.toLowerCase() }; }) : null
    };
  }
  function isFigures(message) { return !!(message && message.metadata && message.metadata.title); }
  function lastUserIndex(messages) {
    for (var i = messages.length - 1; i >= 0; i--) if (messages[i].role === "user") return i;
    return -1;
  }
  function withNote(text, note) { return text ? text + "\n\n" + NOTE_MARK + note : NOTE_MARK + note; }
  function copy(value) { return JSON.parse(JSON.stringify(value)); }
  function same(a, b) { return JSON.stringify(a) === JSON.stringify(b); }

  // -- the chats in storage ----------------------------------------------------------------------
  var notice = "";  // one sentence over the list when a chat could not be saved
  function readChat(id) {
    var raw = id && storage() && storage().getItem(PREFIX + id);
    if (!raw) return null;
    try {
      var chat = JSON.parse(raw);
      return chat && Array.isArray(chat.messages) ? chat : null;
    } catch (error) { return null; }
  }
  function writeChat(chat) {
    if (!storage()) return;
    try {
      storage().setItem(PREFIX + chat.id, JSON.stringify(chat));
      if (notice) { notice = ""; renderList(); }
    } catch (error) {  // QuotaExceededError: said over the list, tried again at the next change
      if (notice !== STORAGE_FULL) { notice = STORAGE_FULL; renderList(); }
    }
  }
  function removeChat(id) {
    if (storage() && id) storage().removeItem(PREFIX + id);
  }
  var parsed = {};  // key -> [raw, summary]: a chat is parsed again only once it changed
  function savedChats() {
    var chats = [], store = storage(), seen = {};
    if (!store) return chats;
    for (var i = 0; i < store.length; i++) {
      var key = store.key(i);
      if (!key || key.indexOf(PREFIX) !== 0) continue;
      var raw = store.getItem(key);
      if (!parsed[key] || parsed[key][0] !== raw) {
        var chat = null;
        try { chat = JSON.parse(raw); } catch (error) { /* not ours to read */ }
        parsed[key] = [raw, chat && Array.isArray(chat.messages) ? {
          id: chat.id, title: chat.title || "Chat", updated: chat.updated || 0,
          text: chat.messages.map(textOf).join("\n").toLowerCase()
        } : null];
      }
      seen[key] = parsed[key];
      if (parsed[key][1]) chats.push(parsed[key][1]);
    }
    parsed = seen;
    return chats.sort(function (a, b) { return b.updated - a.updated; });
  }
  function titleFrom(text) {
    var words = String(text).replace(/\s+/g, " ").trim();
    return words.length > TITLE_CHARS ? words.slice(0, TITLE_CHARS - 1) + "\u2026" : words || "Chat";
  }

  // -- the open chat -----------------------------------------------------------------------------
  // `open` is the chat shown; a new one is saved once its first message is sent.
  var open = draft();
  function draft() { return { id: null, title: "", created: 0, updated: 0, messages: [], versions: {}, replying: null }; }
  // A chat is written at once, or with `soon` (a streaming reply) at most every SAVE_EVERY_MS.
  var pending = null, lastSave = 0;
  function save(chat, soon) {
    if (!chat.id) return;
    chat.updated = Date.now();
    if (soon && Date.now() - lastSave < SAVE_EVERY_MS) {
      if (pending && pending.chat !== chat) flush();
      if (!pending) pending = { chat: chat, timer: setTimeout(flush, SAVE_EVERY_MS) };
      return;
    }
    if (pending && pending.chat === chat) { clearTimeout(pending.timer); pending = null; }
    lastSave = Date.now();
    writeChat(chat);
  }
  function flush() {
    if (!pending) return;
    var chat = pending.chat;
    clearTimeout(pending.timer);
    pending = null;
    lastSave = Date.now();
    writeChat(chat);
  }
  window.addEventListener("pagehide", flush);  // a reload keeps the reply as far as it came

  function setAddress(id) {
    var url = location.pathname + location.search + (id ? "#chat=" + encodeURIComponent(id) : "");
    try { history.replaceState(null, "", url); } catch (error) { /* a sandboxed frame */ }
    try { if (id) tabStorage().setItem(OPEN_KEY, id); else tabStorage().removeItem(OPEN_KEY); } catch (error) { /* none */ }
  }
  function addressedId() {
    var match = /(?:^#|&)chat=([^&]+)/.exec(location.hash);
    if (match) return decodeURIComponent(match[1]);
    var kept = tabStorage() && tabStorage().getItem(OPEN_KEY);
    return kept || null;
  }
  // A chat marked as replying when it is opened: a reload of the tab that was streaming it, or a
  // tab that went long ago. Whatever of the reply had arrived is kept, with a note.
  function settleInterrupted(chat) {
    var replying = chat.replying;
    if (!replying || (replying.tab !== tabId && Date.now() - replying.at < STALE_MS)) return;
    if (busy() && current.chatId === chat.id) return;  // this tab is writing it now
    var messages = chat.messages, asked = lastUserIndex(messages);
    chat.replying = null;
    if (asked < 0) return;
    var words = messages.slice(asked + 1).filter(function (m) { return m.role === "assistant" && !isFigures(m); });
    var text = words.length ? textOf(words[0]) : "";
    var offered = text ? ["Continue", "Retry"] : ["Retry"];
    chat.messages = messages.slice(0, asked + 1).concat([message("assistant", withNote(text, INTERRUPTED), offered)]);
    save(chat, false);
  }
  function openChat(id) {
    cancelEdit();
    var chat = readChat(id);
    if (!chat) return false;
    settleInterrupted(chat);
    open = chat;
    setAddress(chat.id);
    renderList();
    return true;
  }

  // -- versions: Retry and Edit keep what they replace ---------------------------------------------
  // `versions[i]` holds the versions of the conversation from message i on: `tails[k]` is version
  // k+1 (its messages from i on, and the versions further on within it), and the one shown is
  // `current`, whose tail is the conversation itself (null in `tails`).
  function keepVersion(chat, at) {
    var old = { messages: chat.messages.slice(at), versions: laterVersions(chat.versions, at) };
    var versions = earlierVersions(chat.versions, at + 1);
    var kept = chat.versions[at];
    if (kept) {
      kept.tails[kept.current] = old;
      kept.tails.push(null);
      kept.current = kept.tails.length - 1;
      versions[at] = kept;
    } else {
      versions[at] = { tails: [old, null], current: 1 };
    }
    chat.versions = versions;
  }
  function laterVersions(versions, at) {
    var later = {};
    Object.keys(versions || {}).forEach(function (key) { if (Number(key) > at) later[key] = versions[key]; });
    return later;
  }
  function earlierVersions(versions, before) {
    var earlier = {};
    Object.keys(versions || {}).forEach(function (key) { if (Number(key) < before) earlier[key] = versions[key]; });
    return earlier;
  }
  function switchVersion(at, step) {
    var kept = open.versions[at];
    if (!kept || busy()) return;
    var to = kept.current + step;
    if (to < 0 || to >= kept.tails.length) return;
    cancelEdit();
    kept.tails[kept.current] = { messages: open.messages.slice(at), versions: laterVersions(open.versions, at) };
    var chosen = kept.tails[to];
    kept.tails[to] = null;
    kept.current = to;
    var versions = earlierVersions(open.versions, at);
    versions[at] = kept;
    Object.keys(chosen.versions || {}).forEach(function (key) { versions[key] = chosen.versions[key]; });
    open.messages = open.messages.slice(0, at).concat(chosen.messages);
    open.versions = versions;
    save(open, false);
    show(open.messages);
  }
  function dropVersionsFrom(chat, length) {
    chat.versions = earlierVersions(chat.versions, length);
  }

  // -- replies ---------------------------------------------------------------------------------
  // The newest reply: which request, for which chat, from which conversation, and whether it is
  // still coming ("streaming"), being stopped, or "ended". Updates for an older request are
  // left out: they belong to a reply the page has already moved on from.
  var current = null, outgoing = null, heartbeat = null;
  function busy() { return current !== null && current.state !== "ended"; }
  function replyChat() {
    if (!current) return null;
    return current.chatId === open.id ? open : readChat(current.chatId);
  }
  function begin(messages, option) {
    var id = newId();
    current = { id: id, chatId: open.id, base: messages, reply: [], state: "streaming" };
    outgoing = requestFor(id, messages);
    if (option) outgoing.option = option;
    open.replying = { tab: tabId, at: Date.now() };
    save(open, false);
    clearInterval(heartbeat);
    heartbeat = setInterval(function () {
      var chat = busy() && replyChat();
      if (chat) { chat.replying = { tab: tabId, at: Date.now() }; save(chat, true); }
    }, HEARTBEAT_MS);
  }
  function bytes(value) { return new Blob([JSON.stringify(value)]).size; }
  // The conversation, or where it is larger than a request may be, its newest whole turns (and
  // how many older ones were left out: the figures count them among those the model did not see).
  function requestFor(id, messages) {
    var budget = limits.maxRequestBytes - REQUEST_MARGIN_BYTES, omitted = 0, start = 0;
    if (bytes(messages) > budget) {
      var size = 0, asked = lastUserIndex(messages);
      start = asked;
      for (var i = messages.length - 1; i >= 0; i--) {
        size += bytes(messages[i]) + 1;
        if (size > budget && i < asked) break;
        if (messages[i].role === "user") start = i;
      }
      messages.slice(0, start).forEach(function (m) { if (m.role === "user") omitted++; });
    }
    return { id: id, messages: messages.slice(start), omitted: omitted };
  }
  var STOP_SHOWN = { __type__: "update", submit_btn: false, stop_btn: "Stop" };
  var SEND_SHOWN = { __type__: "update", submit_btn: "Send", stop_btn: false };
  // The first step of each reply (chat/web/chat_events.py): the conversation changes here, and
  // the box shows Stop. Returns the box's update and the conversation to show.
  function start(action, value) {
    cancelEdit();
    var messages = open.messages.slice();
    if (action === "send") {
      if (!open.id) {
        open.id = newId();
        open.created = Date.now();
        open.title = titleFrom(value);
        setAddress(open.id);
      }
      messages.push(message("user", String(value)));
    } else if (action === "retry") {
      var asked = lastUserIndex(messages);
      if (asked < 0) return [NO_CHANGE, NO_CHANGE];
      keepVersion(open, asked + 1);
      messages = messages.slice(0, asked + 1);
    } else if (action === "edit") {
      var at = editedIndex(value);
      if (at < 0) return [NO_CHANGE, NO_CHANGE];
      keepVersion(open, at);
      messages = messages.slice(0, at).concat([message("user", textOf(value[at]))]);
    }
    // "option": Continue or Retry under the last reply (the click handler noted which).
    open.messages = messages;
    begin(messages.slice(), action === "option" ? chosenOption : null);
    renderList();
    return [STOP_SHOWN, action === "option" ? NO_CHANGE : messages];
  }
  // Gradio has put the edited text in its own copy of the conversation before the event: the
  // first user message that differs from ours is the one edited.
  var lastEdited = -1, chosenOption = null;
  function editedIndex(shown) {
    for (var i = 0; i < Math.min(shown.length, open.messages.length); i++) {
      if (shown[i].role === "user" && textOf(shown[i]) !== textOf(open.messages[i])) return i;
    }
    return lastEdited;  // sent unchanged: the message whose Edit was clicked (see the click handler)
  }
  // A reply's update, from the server's channel: merged into its chat, shown if that chat is open.
  function replied(update) {
    var reply;
    try { reply = typeof update === "string" ? JSON.parse(update) : update; } catch (error) { return NO_CHANGE; }
    if (!current || !reply || reply.id !== current.id || !Array.isArray(reply.messages)) return NO_CHANGE;
    var chat = replyChat();
    if (!chat) return NO_CHANGE;  // deleted meanwhile
    current.reply = reply.messages;
    var base = current.base;
    chat.messages = base.slice(0, lastUserIndex(base) + 1).concat(reply.messages);
    if (current.state !== "ended") chat.replying = { tab: tabId, at: Date.now() };
    save(chat, current.state !== "ended");
    return chat === open ? chat.messages : NO_CHANGE;
  }
  // The reply has ended (or its stop is settled): `update` is the channel's last value.
  function finish(update) {
    var shown = replied(update);
    var chat = replyChat();
    clearInterval(heartbeat);
    current.state = "ended";
    if (chat) { chat.replying = null; save(chat, false); }
    renderList();
    return shown;
  }

  // -- the list of saved chats ---------------------------------------------------------------------
  var query = "", renaming = null, listScheduled = false;
  function container() { return document.getElementById("saved-chats"); }
  function scheduleList() {
    if (listScheduled) return;
    listScheduled = true;
    setTimeout(function () { listScheduled = false; renderList(); }, 50);
  }
  function renderList() {
    var host = container();
    if (!host) return;
    var list = host.querySelector(".falcon-chats");
    if (!list) {
      list = document.createElement("div");
      list.className = "falcon-chats";
      list.innerHTML = '<p class="falcon-chats-notice" role="status"></p>' +
        '<input type="search" class="falcon-chats-search" placeholder="Search chats" aria-label="Search chats">' +
        '<ul class="falcon-chats-list" aria-label="Saved chats"></ul>';
      host.appendChild(list);
      list.querySelector("input").addEventListener("input", function (event) {
        query = event.target.value.trim().toLowerCase();
        renderList();
      });
    }
    var chats = savedChats();
    list.querySelector(".falcon-chats-notice").textContent = notice;
    list.querySelector(".falcon-chats-search").hidden = chats.length < 2 && !query;
    var shown = query ? chats.filter(function (c) {
      return c.title.toLowerCase().indexOf(query) >= 0 || c.text.indexOf(query) >= 0;
    }) : chats;
    var ul = list.querySelector("ul");
    ul.textContent = "";
    shown.forEach(function (chat) {
      var li = document.createElement("li");
      if (renaming === chat.id) {
        var input = document.createElement("input");
        input.className = "falcon-rename-input";
        input.value = chat.title;
        input.setAttribute("aria-label", "Name of this chat");
        li.appendChild(input);
        setTimeout(function () { input.focus(); input.select(); }, 0);
      } else {
        var link = document.createElement("a");
        link.className = "falcon-chat-link";
        link.href = "#chat=" + encodeURIComponent(chat.id);
        link.textContent = chat.title;
        if (chat.id === open.id) link.setAttribute("aria-current", "page");
        var rename = document.createElement("button");
        rename.type = "button";
        rename.className = "falcon-rename";
        rename.textContent = "\u270e";
        rename.setAttribute("aria-label", "Rename \u201c" + chat.title + "\u201d");
        rename.title = "Rename";
        rename.dataset.chat = chat.id;
        li.appendChild(link);
        li.appendChild(rename);
      }
      ul.appendChild(li);
    });
    if (query && !shown.length) {
      var none = document.createElement("li");
      none.className = "falcon-chats-none";
      none.textContent = "No chat has \u201c" + query + "\u201d.";
      ul.appendChild(none);
    }
  }
  function finishRename(input, keep) {
    var id = renaming, chat = readChat(id);
    renaming = null;
    var title = input.value.replace(/\s+/g, " ").trim();
    if (keep && chat && title) {
      chat.title = title.slice(0, 200);
      chat.renamed = true;
      writeChat(chat);  // renaming does not move a chat up the list
      if (open.id === id) open.title = chat.title;
    }
    renderList();
  }
  document.addEventListener("click", function (event) {
    var rename = event.target.closest && event.target.closest("#saved-chats .falcon-rename");
    if (rename) { renaming = rename.dataset.chat; renderList(); return; }
    var step = event.target.closest && event.target.closest(".falcon-versions button");
    if (step) {
      switchVersion(Number(step.parentNode.dataset.at), Number(step.dataset.step));
      return;
    }
    var edit = event.target.closest && event.target.closest("#conversation button[aria-label='Edit']");
    if (edit) lastEdited = messageIndexNear(edit);
    var option = event.target.closest && event.target.closest("#conversation button.option");
    if (option) chosenOption = option.textContent.trim().toLowerCase();
  }, true);  // before Gradio's own handler starts the reply
  document.addEventListener("keydown", function (event) {
    var input = event.target;
    if (!input.classList || !input.classList.contains("falcon-rename-input")) return;
    if (event.key === "Enter") { event.preventDefault(); finishRename(input, true); }
    if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); finishRename(input, false); }
  }, true);
  document.addEventListener("focusout", function (event) {
    if (event.target.classList && event.target.classList.contains("falcon-rename-input") && renaming) {
      finishRename(event.target, true);
    }
  });

  // -- the conversation on the page ----------------------------------------------------------------
  var toShow = [];
  // Show `messages` in the Chatbot: through a hidden button whose event takes them (`shown`).
  function show(messages) {
    toShow = messages;
    var button = document.getElementById("show-chat");
    if (button) button.click();
  }
  // The messages on the page, one element each, in order (Gradio 6.31's Chatbot: a message being
  // edited is its edit box). Each message's buttons follow its row.
  function messageElements() {
    return document.querySelectorAll(
      "#conversation [data-testid=user], #conversation [data-testid=bot], #conversation textarea.edit-textarea");
  }
  function messageIndexNear(button) {
    var buttons = button.closest(".message-buttons"), row = buttons && buttons.previousElementSibling;
    var inRow = row && row.querySelector("[data-testid=user], [data-testid=bot], textarea.edit-textarea");
    return inRow ? Array.prototype.indexOf.call(messageElements(), inRow) : -1;
  }
  function editButton(editor, name) {
    var row = editor.closest(".message-row"), buttons = row && row.nextElementSibling;
    return buttons && buttons.querySelector("button[aria-label='" + name + "']");
  }
  // An edit left open belongs to its chat: it is cancelled before another chat (or version) shows.
  function cancelEdit() {
    var editor = document.querySelector("#conversation textarea.edit-textarea");
    var cancel = editor && editButton(editor, "Cancel");
    if (cancel) cancel.click();
  }
  // "< k/n >" beside each message that has versions; drawn again as Gradio redraws the messages.
  function drawVersions() {
    var elements = messageElements();
    document.querySelectorAll("#conversation .falcon-versions").forEach(function (nav) {
      var kept = open.versions[nav.dataset.at];
      if (!kept || elements[nav.dataset.at] !== nav.previousElementSibling) nav.remove();
    });
    Object.keys(open.versions).forEach(function (at) {
      var element = elements[at], kept = open.versions[at];
      if (!element) return;
      var nav = element.nextElementSibling;
      if (!nav || !nav.classList.contains("falcon-versions")) {
        nav = document.createElement("div");
        nav.className = "falcon-versions";
        nav.dataset.at = at;
        nav.setAttribute("role", "group");
        nav.setAttribute("aria-label", "Versions of this message");
        nav.innerHTML = '<button type="button" data-step="-1" aria-label="Previous version">\u2039</button>' +
          '<span></span><button type="button" data-step="1" aria-label="Next version">\u203a</button>';
        element.insertAdjacentElement("afterend", nav);
      }
      var label = (kept.current + 1) + "/" + kept.tails.length;
      if (nav.querySelector("span").textContent !== label) nav.querySelector("span").textContent = label;
      nav.querySelector("[data-step='-1']").disabled = kept.current === 0;
      nav.querySelector("[data-step='1']").disabled = kept.current === kept.tails.length - 1;
    });
  }
  var drawing = false;
  new MutationObserver(function () {
    if (drawing) return;
    drawing = true;
    requestAnimationFrame(function () { drawing = false; drawVersions(); });
  }).observe(document.documentElement, { subtree: true, childList: true });

  // Another tab changed the saved chats: the list follows, and so does the open chat when this
  // tab is not writing it.
  window.addEventListener("storage", function (event) {
    if (event.key !== null && event.key.indexOf(PREFIX) !== 0) return;
    scheduleList();
    if (open.id && event.key === PREFIX + open.id && !busy()) {
      var chat = readChat(open.id);
      if (chat && !same(chat.messages, open.messages)) { open = chat; show(open.messages); }
    }
  });
  window.addEventListener("hashchange", function () {
    var id = addressedId();
    if (id && id !== open.id && readChat(id)) { openChat(id); show(open.messages); }
  });

  function savedSettings() {
    try { return JSON.parse(storage().getItem(SETTINGS_KEY)); } catch (error) { return null; }
  }
  // The saved settings for the page's inputs, each checked against `checks` (chat/web/chat_events.py:
  // a slider's [minimum, maximum], or null for text): a value of the wrong kind or out of range
  // (storage is anyone's on this site) leaves its input as it is. So does a setting the person has
  // already changed from its `defaults` when this runs (on a loaded machine Gradio's load step can
  // come after their first keystrokes): what they typed wins, and it is what they see. Every input
  // gets its value back, never an empty update, so the page and what a request sends agree.
  var MAX_SETTING_CHARS = 20000;
  function restoredSettings(checks, defaults, current) {
    var saved = savedSettings();
    var fits = Array.isArray(saved) && saved.length === checks.length;
    return checks.map(function (check, i) {
      if (current[i] !== defaults[i]) return current[i];
      var value = fits ? saved[i] : undefined;
      var ok = check
        ? typeof value === "number" && isFinite(value) && value >= check[0] && value <= check[1]
        : typeof value === "string" && value.length <= MAX_SETTING_CHARS;
      return ok ? value : current[i];
    });
  }

  window.falconChat = Object.assign(window.falconChat || {}, {
    // What chat/web/chat_events.py calls.
    opening: function () {
      var id = addressedId();
      if (!(id && openChat(id))) { open = draft(); setAddress(null); renderList(); }
      return open.messages;
    },
    start: start,
    // A Stop clicked before the reply was asked for (a busy page) is sent along: the server then
    // only marks the reply as stopped.
    request: function () {
      if (outgoing && current && current.state === "stopping") outgoing.stopped = true;
      return outgoing;
    },
    replied: replied,
    replySoFar: function () { return { id: current ? current.id : "", messages: current ? current.reply : [] }; },
    // After a reply's last update (`update`, the channel's value): Send comes back.
    // Both return what the Chatbot shows then: the reply whole, with its figures.
    replyEnded: function (update) {
      return [SEND_SHOWN, current && current.state === "streaming" ? finish(update) : NO_CHANGE];
    },
    // Also called without an update when the server has not answered Stop in time (page.js): the
    // reply ends here, and its note and figures are merged if they come after all.
    stopSettled: function (update) {
      var shown = current && current.state === "stopping" ? finish(update) : replied(update);
      if (window.falconChat.onStopSettled) setTimeout(window.falconChat.onStopSettled, 0);
      return shown;
    },
    undo: function () {
      var messages = open.messages, asked = lastUserIndex(messages);
      if (asked < 0) return [NO_CHANGE, NO_CHANGE];
      var text = textOf(messages[asked]);
      open.messages = messages.slice(0, asked);
      dropVersionsFrom(open, asked);
      if (open.messages.length) save(open, false);
      else { removeChat(open.id); open = draft(); setAddress(null); }
      renderList();
      return [open.messages, text];
    },
    deleteOpenChat: function () {
      removeChat(open.id);
      open = draft();
      setAddress(null);
      renderList();
    },
    newChat: function () {
      cancelEdit();
      open = draft();
      setAddress(null);
      renderList();
      return [];
    },
    shown: function () { return toShow; },
    // Export's request: the conversation, the system prompt, and the chat's name and time (its
    // files are named after them); a conversation larger than a request may be stays here, and
    // the server says so.
    exportRequest: function (history, systemPrompt) {
      var when = new Date(open.created || Date.now());
      function two(n) { return (n < 10 ? "0" : "") + n; }
      var about = {
        title: open.title || "conversation",
        time: when.getFullYear() + "-" + two(when.getMonth() + 1) + "-" + two(when.getDate()) + " " +
          two(when.getHours()) + ":" + two(when.getMinutes())
      };
      var size = bytes(history);
      if (size > limits.maxRequestBytes - REQUEST_MARGIN_BYTES) {
        about.too_long = size;
        history = [];
      }
      return [history, systemPrompt, about];
    },
    saveSettings: function (values) {
      try { storage().setItem(SETTINGS_KEY, JSON.stringify(values)); } catch (error) { /* kept for this page only */ }
    },
    restoredSettings: restoredSettings,
    // What assets/page.js calls.
    stopRequested: function () { if (busy()) current.state = "stopping"; },
    editButton: editButton,
    replying: busy,
    openChatId: function () { return open.id; }
  });
})();

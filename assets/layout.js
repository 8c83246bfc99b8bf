/* Falcon Chat: the saved chats' drawer on phones, the settings over the chat, and names for
   screen readers where Gradio 6.31 gives none or a wrong one.
   - On a narrow window the saved chats (#chat-sidebar) are a drawer: the header's first button
     opens it, and a chat chosen there, New chat, Escape or a tap beside it closes it
     (assets/style.css draws it; it is a sidebar on wider windows);
   - the settings open over the conversation; Escape or a click outside them closes them (Escape
     then does not also stop a streaming reply, as it does otherwise: assets/page.js);
   - the message box is named "Message" (its label also held the Send button's text);
   - a reply's figures are a line of text: Gradio draws them as a button with a chevron that
     opens nothing (a figures message has no body), so neither is announced or focusable;
   - icons beside a button's own text (New chat's, the settings' arrow) are not read out, and
     the fixed seed's button says that it clears the seed ("Seed 42 ✕" reads "times"). */
(function () {
  "use strict";
  var OPEN = "falcon-chats-open";
  var CLOSES_DRAWER = "#new-chat, #saved-chats [role=gridcell], #saved-chats a";

  function toggle() { return document.querySelector(".falcon-chats-toggle"); }
  function setDrawer(open) {
    document.body.classList.toggle(OPEN, open);
    var button = toggle();
    if (button) button.setAttribute("aria-expanded", String(open));
    if (open) {
      var first = document.querySelector("#chat-sidebar button, #chat-sidebar [tabindex]");
      if (first) first.focus({ preventScroll: true });
    }
  }
  function drawerOpen() { return document.body.classList.contains(OPEN); }

  document.addEventListener("click", function (event) {
    var target = event.target.closest ? event.target : null;
    if (!target) return;
    if (target.closest(".falcon-chats-toggle")) return setDrawer(!drawerOpen());
    if (!drawerOpen()) return;
    // A choice in the drawer closes it after Gradio has seen the click; so does a tap beside it.
    if (target.closest(CLOSES_DRAWER)) setTimeout(function () { setDrawer(false); }, 0);
    else if (!target.closest("#chat-sidebar")) setDrawer(false);
  }, true);
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && drawerOpen()) {
      setDrawer(false);
      var button = toggle();
      if (button) button.focus({ preventScroll: true });
    }
  }, true);
  function settingsToggle() { return document.querySelector("#settings > .label-wrap.open"); }
  function closeSettings() {
    var open = settingsToggle();
    if (open) open.click();
    return open;
  }
  // Before the page's own keys (assets/page.js listens on the document).
  window.addEventListener("keydown", function (event) {
    if (event.key !== "Escape" || drawerOpen()) return;
    var open = closeSettings();
    if (!open) return;
    event.preventDefault();
    event.stopImmediatePropagation();
    open.focus({ preventScroll: true });
  }, true);
  document.addEventListener("pointerdown", function (event) {
    if (settingsToggle() && event.target.closest && !event.target.closest("#settings")) closeSettings();
  }, true);

  // Wider than a phone, the drawer is a sidebar: nothing stays "open" for a later narrow window.
  window.matchMedia("(min-width: 769px)").addEventListener("change", function (query) {
    if (query.matches) setDrawer(false);
  });

  function name() {
    var box = document.querySelector("#message textarea");
    if (box && box.getAttribute("aria-label") !== "Message") box.setAttribute("aria-label", "Message");
    document.querySelectorAll("#new-chat img, #settings .label-wrap .icon").forEach(function (icon) {
      if (icon.tagName === "IMG") { if (icon.getAttribute("alt") !== "") icon.setAttribute("alt", ""); }
      else if (!icon.hasAttribute("aria-hidden")) icon.setAttribute("aria-hidden", "true");
    });
    var figures = "#conversation [data-testid=bot][aria-label=\"bot's message: \"] .title[role=button]";
    document.querySelectorAll(figures).forEach(function (title) {
      title.removeAttribute("role");
      title.removeAttribute("tabindex");
      title.classList.add("falcon-figures");
      title.querySelectorAll("button").forEach(function (chevron) {
        chevron.setAttribute("aria-hidden", "true");
        chevron.tabIndex = -1;
      });
    });
  }
  var seedWatched = null;
  function nameSeed(button) {
    var label = button.textContent.replace("\u2715", "").trim() + " (clear it)";
    if (button.getAttribute("aria-label") !== label) button.setAttribute("aria-label", label);
    button.title = "Clear the fixed seed";
  }
  new MutationObserver(function () {
    name();
    var seed = document.querySelector("#fixed-seed");
    if (seed && seed !== seedWatched) {  // its text changes with the seed, not its children
      seedWatched = seed;
      nameSeed(seed);
      new MutationObserver(function () { nameSeed(seed); }).observe(seed, { subtree: true, childList: true, characterData: true });
    }
  }).observe(document.documentElement, { subtree: true, childList: true });
})();

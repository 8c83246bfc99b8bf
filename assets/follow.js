/* Falcon Chat: a streaming reply is followed only while the reader is at its end.
   Gradio 6.31's Chatbot queues a scroll to the bottom after every update, so a reader who scrolls
   up during a stream is pulled back within ~15-60 ms; the page turns that off (the Chatbot's
   public `autoscroll=False`, chat/web/page.py) and follows here instead:
   - while the reader is at the end of the conversation, new text keeps the end in view;
   - scrolling up (wheel, finger, keys, the scrollbar) stops following at once, and a
     "Jump to newest" button appears over the conversation;
   - reaching the end again (by scrolling, or with that button) follows again;
   - sending a message, Retry, Edit, New chat or another saved chat go to the end and follow. */
(function () {
  "use strict";
  var AT_END_PX = 8;  // this close to the end counts as at the end (fractional pixels, rounding)
  var MOVED_UP_PX = 2;  // less than this away from the end after a scroll is a clamp, not a reader
  var LOG = "#conversation .bubble-wrap, #conversation .panel-wrap";
  // What puts the newest message at the end for the reader to see: the reader wants it shown.
  var FOLLOW_AFTER = [
    "#message button.submit-button",
    "#conversation button[aria-label='Retry']",
    "#conversation .message button",  // Edit's Submit inside the edited message
    "#new-chat",
    "#saved-chats a.falcon-chat-link",
    "#conversation button.option",  // Continue or Retry under the last reply
    "#conversation button.example"
  ].join(", ");

  var following = true, lastTop = 0, scheduled = false, jump = null;

  function log() { return document.querySelector(LOG); }
  function distanceToEnd(element) { return element.scrollHeight - element.scrollTop - element.clientHeight; }

  function setFollowing(value) {
    following = value;
    if (jump) jump.hidden = value;
  }

  function toEnd() {
    var element = log();
    if (element) element.scrollTop = element.scrollHeight;
  }

  function follow() {
    setFollowing(true);
    toEnd();
  }

  // The conversation changed: keep its end in view, once a frame, while following.
  function changed() {
    if (scheduled || !following) return;
    scheduled = true;
    requestAnimationFrame(function () {
      scheduled = false;
      if (following) toEnd();
    });
  }

  function jumpButton(container) {
    var button = document.createElement("button");
    button.type = "button";
    button.className = "falcon-jump";
    button.textContent = "\u2193 Jump to newest";
    button.hidden = following;
    button.addEventListener("click", function () {
      follow();
      var box = document.querySelector("#message textarea");
      if (box) box.focus({ preventScroll: true });
    });
    container.appendChild(button);
    return button;
  }

  function stopFollowing() { if (following) setFollowing(false); }

  // The reader's own moves, seen before the scroll they cause: the next update does not undo them.
  document.addEventListener("wheel", function (event) {
    if (event.deltaY < 0 && event.target.closest && event.target.closest(LOG)) stopFollowing();
  }, { capture: true, passive: true });
  var touchY = null;
  document.addEventListener("touchstart", function (event) {
    touchY = event.touches.length === 1 ? event.touches[0].clientY : null;
  }, { capture: true, passive: true });
  document.addEventListener("touchmove", function (event) {
    // A finger moving down the screen scrolls the conversation up.
    if (touchY !== null && event.touches[0].clientY > touchY + 2 && event.target.closest && event.target.closest(LOG)) stopFollowing();
  }, { capture: true, passive: true });
  document.addEventListener("keydown", function (event) {
    var keys = ["PageUp", "ArrowUp", "Home"];
    if (keys.indexOf(event.key) !== -1 && event.target.closest && event.target.closest(LOG)) stopFollowing();
  }, true);
  // The scrollbar (and anything else) shows only as scrolls: up and away from the end stops
  // following; at the end it follows again. Content that shrinks clamps the view to the end,
  // which is not the reader moving.
  document.addEventListener("scroll", function (event) {
    var element = event.target;
    if (!element.matches || !element.matches(LOG)) return;
    var top = element.scrollTop, away = distanceToEnd(element);
    if (top < lastTop && away > MOVED_UP_PX) stopFollowing();
    else if (away <= AT_END_PX && !following) setFollowing(true);
    lastTop = top;
  }, true);

  document.addEventListener("click", function (event) {
    if (event.target.closest && event.target.closest(FOLLOW_AFTER)) follow();
  }, true);
  document.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && event.target.closest && event.target.closest("#message textarea, #conversation .message textarea")) follow();
  }, true);

  new MutationObserver(function (mutations) {
    var container = document.querySelector("#conversation");
    if (!container) return;
    if (!jump || !container.contains(jump)) jump = jumpButton(container);
    for (var i = 0; i < mutations.length; i++) {
      var target = mutations[i].target;
      if (target !== jump && container.contains(target)) return changed();
    }
  }).observe(document.documentElement, { subtree: true, childList: true, characterData: true });
  // Math and code that lay out after the text arrived change the height without a mutation.
  if (window.ResizeObserver) {
    var watched = null, resized = new ResizeObserver(changed);
    setInterval(function () {
      var content = document.querySelector("#conversation .message-wrap");
      if (content && content !== watched) {
        if (watched) resized.unobserve(watched);
        resized.observe(content);
        watched = content;
      }
    }, 500);
  }

  window.falconFollow = { following: function () { return following; } };
})();

"""What the browser tests measure on the page as drawn: the contrast of every visible text, icon and
placeholder (from computed colours, as WCAG 2.2 defines it), the targets' sizes, and the share of
the window the conversation gets. Each is a script evaluated in the page; each returns plain data
for the test to assert on."""

from __future__ import annotations

# Colours of any CSS syntax (rgb, hex, color(srgb ...), oklch...) are read back through a canvas as
# 8-bit sRGB; an element's background is its ancestors' backgrounds composited from the first
# opaque one up (a gradient counts as each of its colours: the worst one is taken); text and icons
# are composited over it with their alpha times every ancestor's opacity.
_COLOURS = r"""
  const canvas = document.createElement("canvas").getContext("2d", { willReadFrequently: true });
  const rgba = (css) => {
    canvas.clearRect(0, 0, 1, 1);
    canvas.fillStyle = "rgba(0, 0, 0, 0)";
    canvas.fillStyle = css;
    canvas.fillRect(0, 0, 1, 1);
    const [r, g, b, a] = canvas.getImageData(0, 0, 1, 1).data;
    return [r, g, b, a / 255];
  };
  const over = ([r, g, b, a], [R, G, B]) => [r * a + R * (1 - a), g * a + G * (1 - a), b * a + B * (1 - a)];
  const luminance = (rgb) => {
    const [r, g, b] = rgb.map((c) => { c /= 255; return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const ratio = (x, y) => { const [a, b] = [luminance(x), luminance(y)].sort((p, q) => q - p); return (a + 0.05) / (b + 0.05); };
  const gradientColours = (image) => (image.match(/(rgba?\([^)]*\)|#[0-9a-f]{3,8}\b|color\([^)]*\)|oklch\([^)]*\))/gi) || []);
  // The possible backgrounds behind an element: one per gradient colour, else one.
  const backgrounds = (element) => {
    const layers = [];
    for (let e = element; e; e = e.parentElement) {
      const style = getComputedStyle(e);
      const stops = gradientColours(style.backgroundImage);
      const colour = rgba(style.backgroundColor);
      if (stops.length) { layers.push(stops.map(rgba)); break; }
      if (colour[3] > 0) layers.push([colour]);
      if (colour[3] >= 1) break;
    }
    let results = [[255, 255, 255]];  // the canvas
    for (const layer of layers.reverse()) {
      results = layer.flatMap((colour) => results.map((below) => over(colour, below)));
    }
    return results;
  };
  const opacity = (element) => {
    let value = 1;
    for (let e = element; e; e = e.parentElement) value *= Number(getComputedStyle(e).opacity);
    return value;
  };
  const worst = (css, element, alpha) => {
    const [r, g, b, a] = rgba(css);
    return Math.min(...backgrounds(element).map((bg) => ratio(over([r, g, b, a * alpha], bg), bg)));
  };
  const shown = (e) => {
    const box = e.getBoundingClientRect();
    const style = getComputedStyle(e);
    return box.width > 2 && box.height > 2 && style.visibility !== "hidden" && e.checkVisibility({ opacityProperty: true });
  };
  const describe = (e) => (e.id ? "#" + e.id : e.tagName.toLowerCase() + "." + [...e.classList].filter((c) => !c.startsWith("svelte")).join("."))
    + " " + (e.getAttribute("aria-label") || e.textContent || e.placeholder || "").trim().slice(0, 40);
"""

# Every visible text (4.5:1, or 3:1 when large), placeholder (4.5:1) and icon-only button (3:1) in
# `root` whose contrast is under what WCAG 2.2 asks (1.4.3, 1.4.11): [what, ratio, needed].
CONTRAST_PROBLEMS = (
    "(root) => {"
    + _COLOURS
    + r"""
  const problems = [];
  const check = (what, css, element, alpha, needed) => {
    const value = worst(css, element, alpha);
    if (value < needed) problems.push([what, Math.round(value * 100) / 100, needed]);
  };
  for (const e of document.querySelectorAll(root + " *")) {
    if (e.closest("svg, .katex, pre, code, [aria-hidden=true]") || !shown(e)) continue;
    const style = getComputedStyle(e);
    const text = [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (text) {
      const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
      check(describe(e), style.color, e, opacity(e), size >= 24 || (size >= 18.66 && bold) ? 3 : 4.5);
    }
    if ((e.tagName === "TEXTAREA" || e.tagName === "INPUT") && e.placeholder && !e.value) {
      check("placeholder of " + describe(e), getComputedStyle(e, "::placeholder").color, e, opacity(e), 4.5);
    }
    if (e.tagName === "BUTTON" && !e.innerText.trim()) {
      // An icon: the svg's stroke or fill, else the button's colour (icons drawn with a mask).
      const path = e.querySelector("svg path, svg rect, svg circle, svg polyline, svg line");
      const drawn = path && getComputedStyle(path);
      const paint = drawn && drawn.stroke !== "none" ? drawn.stroke : drawn && drawn.fill !== "none" ? drawn.fill : style.color;
      check("icon " + describe(e), paint, e, opacity(path || e), 3);
    }
  }
  return problems;
}"""
)

# The focus ring drawn on the focused element or on one of its ancestors up to `container`:
# [outline or box-shadow ring width in px, the worst contrast of its colour against what is around
# it], or [0, 0] when there is none.
FOCUS_RING = (
    "(container) => {"
    + _COLOURS
    + r"""
  const outer = document.activeElement.closest(container);
  for (let e = document.activeElement; e && outer && outer.contains(e); e = e.parentElement) {
    const style = getComputedStyle(e);
    const width = style.outlineStyle !== "none" ? parseFloat(style.outlineWidth) : 0;
    if (width > 0) return [width, worst(style.outlineColor, e.parentElement, 1)];
    const ring = style.boxShadow.match(/(rgba?\([^)]*\)|#[0-9a-f]+)[^,]*?0px 0px 0px (\d+(?:\.\d+)?)px/);
    if (ring) return [parseFloat(ring[2]), worst(ring[1], e.parentElement, 1)];
  }
  return [0, 0];
}"""
)

# Visible buttons and links in `root` smaller than `size` x `size` CSS pixels: [what, width, height].
SMALL_TARGETS = r"""([root, size]) => [...document.querySelectorAll(root + " button, " + root + " a[href], " + root + " [role=tab], " + root + " [role=gridcell]")]
  .filter((e) => { const box = e.getBoundingClientRect(); return box.width > 2 && box.height > 2 && e.checkVisibility({ visibilityProperty: true }); })
  .map((e) => { const box = e.getBoundingClientRect(); return [(e.getAttribute("aria-label") || e.innerText || e.className).trim().slice(0, 40), Math.round(box.width), Math.round(box.height)]; })
  .filter(([, width, height]) => width < size - 0.5 || height < size - 0.5)"""

# The conversation's height, the window's, and whether the message box is wholly on screen.
CONVERSATION_SHARE = r"""() => {
  const conversation = document.querySelector("#conversation").getBoundingClientRect();
  const box = document.querySelector("#message textarea").getBoundingClientRect();
  return {
    conversation: conversation.height, window: window.innerHeight,
    box_on_screen: box.top >= 0 && box.bottom <= window.innerHeight && box.left >= 0 && box.right <= window.innerWidth,
    page_scrolls: document.documentElement.scrollHeight > window.innerHeight + 1,
  };
}"""

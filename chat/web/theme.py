"""The page's colours: Gradio's Soft theme in amber, with every text at 4.5:1 and every icon at 3:1
or more against what is behind it, in light and dark (WCAG 2.2, 1.4.3 and 1.4.11).

Soft draws text and icons in amber-500 on white (2.15:1: the chat's icons, the selected tab, the
settings' labels), white on amber buttons (New chat: 2.15:1 light, 3.19:1 dark) and grey-400
placeholders and notes (2.5:1). Measured in Chromium from computed colours by
tests/browser/test_look.py, which fails on any visible text or icon under those ratios.
"""

from __future__ import annotations

import gradio as gr


def page_theme() -> gr.themes.Base:
    """Soft, amber, readable."""
    return gr.themes.Soft(primary_hue="amber").set(
        background_fill_primary="*neutral_50",  # Soft's own, which a second `set` resets to white
        # Amber stays the buttons' colour, with dark text on it (11:1) instead of white.
        button_primary_background_fill="*primary_400",
        button_primary_background_fill_dark="*primary_400",
        button_primary_background_fill_hover="*primary_300",
        button_primary_background_fill_hover_dark="*primary_300",
        button_primary_border_color="*primary_400",
        button_primary_border_color_dark="*primary_400",
        button_primary_text_color="*neutral_950",
        button_primary_text_color_dark="*neutral_950",
        # Amber text and icons on light backgrounds: amber-700 and -800 (dark: style.css).
        color_accent="*primary_700",
        block_label_text_color="*primary_800",
        block_title_text_color="*primary_800",
        # The settings' labels: white on amber-800 in dark, not amber-600 (3.19:1).
        block_label_background_fill_dark="*primary_800",
        # Notes, slider ends and placeholders one step darker (lighter in dark).
        body_text_color_subdued="*neutral_600",
        body_text_color_subdued_dark="*neutral_300",
        input_placeholder_color="*neutral_500",
        input_placeholder_color_dark="*neutral_300",
    )

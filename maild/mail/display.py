"""Text from strangers, made safe to show on a terminal (and, later, a web page).

Subjects, names and bodies are stored as received. Shown as they are, the
Unicode bidirectional controls (U+202E RIGHT-TO-LEFT OVERRIDE and its kin)
reorder what a reader sees (`invoice_exe.pdf` spelled backwards), and C0/C1
control characters (ESC starts a terminal's escape sequences) can rewrite the
screen. `for_display` shows each as a visible `<U+XXXX>`; `json_safe` escapes
them as `\\uXXXX` in JSON text, which decodes to the same data.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL and the C1 controls, and the bidi controls:
# ALM, LRM, RLM, LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI, PDI.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def for_display(text: str) -> str:
    """The text with every control and bidi control shown as `<U+XXXX>`."""
    return _UNSAFE.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)


def json_safe(text: str) -> str:
    """JSON text (from json.dumps) with the same characters escaped as `\\uXXXX`."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)

"""HTML bodies to plain text, for HTML-only mail. The HTML is never rendered.

A small tokenizer of our own rather than `html.parser`: the standard library's
parser rescans to the end of the input for every `<` that does not close
(`"<a" * 50_000`, 100 KB, took 13 s on Python 3.11, and four times the input
sixteen times as long), so one hostile body could hold a parser worker past
its timeout. Here every character is looked at a bounded number of times.
Markup follows the browsers' reading where it matters for text: a comment
runs to `-->`, a tag to the next `>` (quotes are not tracked), script and
style content to their end tag, and an unclosed comment or tag hides the
rest. Character references are decoded with `html.unescape`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape

_BLOCK = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "dd",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "tr",
        "ul",
    }
)
_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript"})
_PRE = "\x01"  # marks a line that starts inside <pre>: its indentation is content


_MARKUP = re.compile(r"<[a-zA-Z!?/]")
_TAG_NAME = re.compile(r"</?([a-zA-Z][^\t\n\r\f />\x00]*)")
# elements whose content is not markup, and where it ends
_RAW_TEXT_END = {
    name: re.compile(rf"</{name}[\t\n\r\f />]", re.IGNORECASE) for name in ("script", "style")
}


def _tokens(html: str) -> Iterator[tuple[str, str]]:
    """("data", text) with references decoded, ("start" | "end" | "startend", tag name)."""
    position, size = 0, len(html)
    while position < size:
        markup = _MARKUP.search(html, position)  # a "<" followed by anything else is text
        if markup is None:
            yield "data", unescape(html[position:])
            return
        lt = markup.start()
        if lt > position:
            yield "data", unescape(html[position:lt])
        if html.startswith("<!--", lt):
            close = html.find("-->", lt + 2)  # "<!-->" is an empty comment
            if close < 0:
                return  # an unclosed comment hides the rest
            position = close + 3
            continue
        tag = _TAG_NAME.match(html, lt)
        gt = html.find(">", tag.end() if tag else lt + 2)
        if gt < 0:
            return  # an unclosed tag hides the rest
        position = gt + 1
        if tag is None:  # <!DOCTYPE>, <![CDATA[...]]>, <?xml?>, </ >: nothing to show
            continue
        name = tag.group(1).lower()
        if html.startswith("</", lt):
            yield "end", name
        elif html[gt - 1] == "/" and gt - 1 >= tag.end():
            yield "startend", name
        else:
            yield "start", name
            if name in _RAW_TEXT_END:
                end = _RAW_TEXT_END[name].search(html, position)
                if end is None:
                    yield "data", html[position:]
                    return
                yield "data", html[position : end.start()]
                position = end.start()


class _TextExtractor:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self._skip_depth = 0
        self._pre_depth = 0

    def handle_starttag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip_depth += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag in ("td", "th"):
            self.parts.append("\t")
        elif tag in _BLOCK:
            self.parts.append("\n\n" if tag == "p" else "\n")
        if tag == "pre":
            self._pre_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self._pre_depth = max(0, self._pre_depth - 1)

    def handle_startendtag(self, tag: str) -> None:
        if tag == "br" or tag == "hr":
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        data = data.replace(_PRE, "")
        if self._pre_depth:
            self.parts.append(_PRE + data.replace("\n", "\n" + _PRE))
        else:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Readable text from an HTML body: block structure kept, markup and scripts dropped."""
    extractor = _TextExtractor()
    handlers = {
        "data": extractor.handle_data,
        "start": extractor.handle_starttag,
        "end": extractor.handle_endtag,
        "startend": extractor.handle_startendtag,
    }
    for kind, value in _tokens(html):
        handlers[kind](value)
    text = "".join(extractor.parts)
    lines = [_tidy(line) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _tidy(line: str) -> str:
    """Strip the spaces block boundaries leave, except the indentation inside <pre>."""
    if _PRE in line:
        head, _, rest = line.partition(_PRE)
        return (head.strip(" \t") + rest.replace(_PRE, "")).rstrip(" \t")
    return line.strip(" \t")

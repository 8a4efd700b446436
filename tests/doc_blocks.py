"""The fenced code blocks of a markdown page, for tests that run a page's examples as written."""

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?P<info>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
TITLE = re.compile(r'title="([^"]+)"')


@dataclass(frozen=True)
class Block:
    lang: str
    #: the file the block is, for blocks fenced as ```python title="name.py"
    title: str
    code: str
    #: the line (1-based) of the page the code starts on
    line: int

    def padded(self):
        """The code with as many blank lines before it as the page has: a file written from it reports
        the page's line numbers."""
        return "\n" * (self.line - 1) + self.code


def blocks(path):
    text = Path(path).read_text()
    found = []
    for match in FENCE.finditer(text):
        title = TITLE.search(match.group("info"))
        found.append(Block(match.group("lang"), title.group(1) if title else "", match.group("code"),
                           text[:match.start("code")].count("\n") + 1))
    return found

"""Plain-text articles streamed from MediaWiki XML dumps (``*.xml`` or ``*.xml.bz2``).

Dumps are read page by page with :mod:`mwxml` (an ``iterparse`` stream over the
possibly bzip2-compressed file), so memory stays bounded by the largest page
rather than by the dump.  Wikitext is turned into prose with
:mod:`mwparserfromhell`: the parse tree is pruned of everything that does not
render as running text (templates, references, tables, media and category
links, headings, back-matter sections) before ``strip_code`` flattens it.

An article comes out as paragraphs separated by one blank line; lines inside a
paragraph (list items, for instance) are separated by a single newline.
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import pathlib
import re
from collections.abc import Iterator
from typing import BinaryIO
from xml.etree.ElementTree import ParseError

import mwparserfromhell
import mwxml
from mwparserfromhell.nodes import (
    Argument,
    Comment,
    ExternalLink,
    Heading,
    Node,
    Tag,
    Template,
    Text,
    Wikilink,
)
from mwparserfromhell.wikicode import Wikicode
from mwxml.errors import MalformedXML

__all__ = ["check_wiki_dump", "clean_wikitext", "iter_wiki_articles"]

# What reading a damaged or foreign file raises, found by feeding mwxml bad input:
#   ParseError      not XML at all, or XML cut short (a truncated .xml)
#   AssertionError  well-formed XML whose root is not <mediawiki> (mwxml checks it
#                   with a bare `assert`; under `python -O` the same file still
#                   fails, later, with MalformedXML)
#   MalformedXML    a <mediawiki> root with unexpected children or no <siteinfo>
#   EOFError        a .bz2 cut short
#   OSError         a .bz2 that is not bzip2 data, or a file that cannot be opened
#   ValueError, TypeError  a missing or non-numeric <ns>/<id>
_DUMP_ERRORS = (
    ParseError, AssertionError, MalformedXML, EOFError, OSError, ValueError, TypeError,
)

# Section titles whose bodies are citations, link lists or navigation, not prose.
_BACK_MATTER = frozenset({
    "references", "notes", "citations", "footnotes", "sources", "bibliography",
    "notes and references", "references and notes", "works cited", "see also",
    "external links", "further reading",
})

# Tags whose contents are not running text: citations, tables, formulas, media, code.
_DROPPED_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "ce", "score",
    "timeline", "imagemap", "graph", "mapframe", "maplink", "syntaxhighlight",
    "source", "pre", "templatedata", "templatestyles", "categorytree", "inputbox",
    "hiero", "includeonly",
})

# Link namespaces that render as images or page metadata instead of text.
_DROPPED_LINK_PREFIXES = frozenset({"file", "image", "media", "category"})

# Inline templates whose output is the words of the sentence they sit in.
_TEXT_TEMPLATES = frozenset({"lang", "nowrap", "nobr", "convert", "cvt"})
_RANGE_WORDS = frozenset({"to", "and", "or", "-", "–", "x", "by"})


def check_wiki_dump(path: str | pathlib.Path) -> None:
    """Raise ValueError unless *path* opens as a MediaWiki dump with a readable header.

    Only the start of the file is read (up to the end of ``<siteinfo>``), so this
    is cheap enough to run over every input before a long job starts; damage
    further into the file is reported by :func:`iter_wiki_articles` when reached.
    """
    path = pathlib.Path(path)
    with _dump_errors(path), _open_dump(path) as stream:
        mwxml.Dump.from_file(stream)


def iter_wiki_articles(
    path: str | pathlib.Path, stats: collections.Counter
) -> Iterator[str]:
    """Yield the plain text of each article (namespace 0, not a redirect) in a dump.

    Skipped pages are counted in *stats* under ``wiki_non_article``,
    ``wiki_redirect`` and ``wiki_empty`` (no prose left after cleaning).
    Raises ValueError naming *path* if the file is not a readable dump, including
    when the damage is only found part-way through.
    """
    path = pathlib.Path(path)
    for namespace, redirect, text in _iter_pages(path):
        if namespace != 0:
            stats["wiki_non_article"] += 1
        elif redirect is not None or _is_redirect_text(text):
            stats["wiki_redirect"] += 1
        else:
            article = clean_wikitext(text or "")
            if article:
                yield article
            else:
                stats["wiki_empty"] += 1


def clean_wikitext(text: str) -> str:
    """Render wikitext as plain prose: paragraphs split by blank lines, no markup."""
    code = mwparserfromhell.parse(text)
    _drop_headings_and_back_matter(code)
    _prune(code)
    return _tidy(code.strip_code(normalize=True, collapse=True))


def _iter_pages(path: pathlib.Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (namespace, redirect target, latest revision text) for each page."""
    with _dump_errors(path), _open_dump(path) as stream:
        for page in mwxml.Dump.from_file(stream).pages:
            text = None
            # Revisions are stored oldest first; only the last one is kept.
            for revision in page:
                text = revision.text
            yield page.namespace, page.redirect, text


def _open_dump(path: pathlib.Path) -> BinaryIO:
    # Binary mode lets the XML parser honour the encoding the dump declares.
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")


@contextlib.contextmanager
def _dump_errors(path: pathlib.Path) -> Iterator[None]:
    """Turn the many ways a bad file fails inside mwxml into one ValueError."""
    try:
        yield
    except _DUMP_ERRORS as exc:
        raise ValueError(
            f"{path}: not a readable MediaWiki XML dump: {_describe(exc)}"
        ) from exc


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    if isinstance(exc, AssertionError) and not message:
        return "root element is not <mediawiki>"
    if isinstance(exc, ParseError):
        # mwxml re-raises header parse errors with up to 500 raw bytes of the
        # file appended; they make the message unreadable and add nothing.
        return "XML parse error: " + re.sub(r": b['\"].*\Z", "", message, flags=re.DOTALL)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _is_redirect_text(text: str | None) -> bool:
    # Some dumps mark redirects only in the text, not with a <redirect> element.
    return text is not None and text.lstrip()[:9].upper() == "#REDIRECT"


def _drop_headings_and_back_matter(code: Wikicode) -> None:
    """Remove every heading, and whole sections such as "References" with theirs.

    A heading line is a title, not a sentence; a back-matter section runs until
    the next heading of the same or a higher level.
    """
    doomed = []
    skipping_level = None
    for index, node in enumerate(code.nodes):
        if isinstance(node, Heading):
            doomed.append(index)
            if skipping_level is not None and node.level > skipping_level:
                continue
            title = node.title.strip_code().strip().lower()
            skipping_level = node.level if title in _BACK_MATTER else None
        elif skipping_level is not None:
            doomed.append(index)
    for index in reversed(doomed):
        del code.nodes[index]


def _prune(code: Wikicode) -> None:
    """Delete, in place and at any depth, the nodes that do not render as prose."""
    for index in reversed(range(len(code.nodes))):
        node = code.nodes[index]
        replacement = _replacement(node)
        if replacement is None:
            for child in _visible_children(node):
                _prune(child)
        elif replacement:
            code.nodes[index] = Text(replacement)
        else:
            del code.nodes[index]


def _replacement(node: Node) -> str | None:
    """Text to put in place of *node*: "" deletes it, None keeps it as it is."""
    if isinstance(node, (Comment, Argument, Heading)):
        return ""
    if isinstance(node, Template):
        return _template_text(node)
    if isinstance(node, Tag):
        name = str(node.tag).strip().lower()
        if name == "br":
            return " "
        return "" if name in _DROPPED_TAGS else None
    if isinstance(node, Wikilink):
        return "" if _is_hidden_link(node) else None
    if isinstance(node, ExternalLink) and not node.brackets:
        return ""  # a bare URL
    return None


def _visible_children(node: Node) -> list[Wikicode]:
    if isinstance(node, Tag) and node.contents is not None:
        return [node.contents]
    if isinstance(node, Wikilink) and node.text is not None:
        return [node.text]
    if isinstance(node, ExternalLink) and node.title is not None:
        return [node.title]
    return []


def _is_hidden_link(link: Wikilink) -> bool:
    """Media, category and interlanguage links: they do not show as words."""
    title = str(link.title).strip()
    if title.startswith(":"):
        return False  # [[:Category:X]] is an ordinary visible link
    prefix, colon, _ = title.partition(":")
    if not colon:
        return False
    prefix = prefix.strip().lower()
    if prefix in _DROPPED_LINK_PREFIXES:
        return True
    return link.text is None and re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", prefix) is not None


def _template_text(template: Template) -> str:
    """Keep the words of a few inline templates; every other template renders as nothing."""
    name = str(template.name).strip().lower().replace("_", " ")
    if name not in _TEXT_TEMPLATES:
        return ""
    args = []
    for param in template.params:
        if not param.showkey:
            _prune(param.value)
            args.append(param.value.strip_code(normalize=True, collapse=True).strip())
    if name in ("nowrap", "nobr"):
        return args[0] if args else ""
    if name == "lang":
        return args[1] if len(args) > 1 else ""
    # {{convert|5|km|mi}} reads "5 km"; {{convert|2|to|5|cm}} reads "2 to 5 cm".
    if len(args) >= 4 and args[1] in _RANGE_WORDS:
        return " ".join(args[:4])
    return " ".join(args[:2])


def _tidy(text: str) -> str:
    """Normalise spacing and drop lines that hold no words, keeping paragraphs."""
    text = re.sub(r"[\u00a0\u2007\u2009\u202f]", " ", text)
    text = re.sub(r"[\u200b\u200e\u200f\ufeff]", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)  # behaviour switches such as __NOTOC__
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [_tidy_line(line) for line in block.split("\n")]
        lines = [line for line in lines if re.search(r"\w", line)]
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _tidy_line(line: str) -> str:
    # Removed templates leave gaps such as "Curie ( ; ; 7 November 1867)".
    line = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", line)
    line = re.sub(r"(?:\s*[,;:])+\s*\)", ")", line)
    line = re.sub(r"\(\s*\)", "", line)
    line = re.sub(r"[ \t]+", " ", line)
    line = re.sub(r" ([,.;:!?)])", r"\1", line)
    line = re.sub(r"\( ", "(", line)
    return line.strip()

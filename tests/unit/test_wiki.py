"""Reading articles out of MediaWiki XML dumps (pipeline.data.wiki)."""

from __future__ import annotations

import bz2
import collections
import inspect
import pathlib
import re

import pytest

from pipeline.data.wiki import check_wiki_dump, clean_wikitext, iter_wiki_articles

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures/wiki/enwiki-excerpt.xml.bz2"

MARKUP = ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "==", "'''", "''",
          "<!--", "&nbsp;", "__TOC__", "thumb|", "Category:", "File:", "Image:", "<math")

DUMP_HEAD = (
    '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n'
    "<siteinfo><sitename>Wikipedia</sitename><namespaces>"
    '<namespace key="0" case="first-letter" /></namespaces></siteinfo>\n'
)


def revision_xml(rev_id: int, text: str) -> str:
    return (f'<revision><id>{rev_id}</id><timestamp>2024-01-0{rev_id}T00:00:00Z</timestamp>'
            f'<text bytes="{len(text)}" xml:space="preserve">{text}</text></revision>')


def page_xml(title: str, *revisions: str, ns: int = 0) -> str:
    return f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{''.join(revisions)}</page>\n"


def read_all(path: pathlib.Path) -> tuple[list[str], collections.Counter]:
    stats = collections.Counter()
    return list(iter_wiki_articles(path, stats)), stats


@pytest.fixture(scope="module")
def fixture_articles() -> tuple[list[str], collections.Counter]:
    return read_all(FIXTURE)


@pytest.fixture()
def plain_xml(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "enwiki-excerpt.xml"
    path.write_bytes(bz2.decompress(FIXTURE.read_bytes()))
    return path


def test_yields_only_the_four_articles(fixture_articles):
    articles, _ = fixture_articles
    assert [a.split(" ", 2)[:2] for a in articles] == [
        ["Jupiter", "is"], ["Photosynthesis", "is"], ["Marie", "Salomea"], ["Plate", "tectonics"]]


def test_skipped_pages_are_counted(fixture_articles):
    _, stats = fixture_articles
    assert stats == {"wiki_redirect": 1, "wiki_non_article": 2, "wiki_empty": 1}


def test_markup_is_stripped(fixture_articles):
    for article in fixture_articles[0]:
        for marker in MARKUP:
            assert marker not in article, (marker, article[:80])
        assert "()" not in article and "( " not in article and "  " not in article


def test_link_bold_and_italic_text_is_kept(fixture_articles):
    jupiter, photosynthesis, curie, tectonics = fixture_articles[0]
    assert "named after the Roman god Jupiter, the king of the gods." in jupiter  # piped link
    assert "Ganymede is the largest moon" in jupiter and "Ganymede (moon)" not in jupiter
    assert "discovered by Voyager 1 in 1979." in jupiter  # italic link, {{sfn}} removed
    assert "contain the green pigment chlorophyll." in photosynthesis  # bold link
    assert "Plate tectonics is the scientific theory" in tectonics
    assert curie.startswith("Marie Salomea Skłodowska-Curie (7 November 1867 – 4 July 1934) was")


def test_inline_templates_keep_their_words(fixture_articles):
    jupiter, _, curie, _ = fixture_articles[0]
    assert "Its mean radius of 69911 km is about eleven times" in jupiter
    assert "known as petites Curies, to help" in curie


def test_refs_tables_media_headings_and_back_matter_are_dropped(fixture_articles):
    text = "\n".join(fixture_articles[0])
    for gone in ("Nobel Prize Outreach", "Experiments upon Vegetables",  # <ref> bodies
                 "3,643", "Mid-Atlantic Ridge", "Shared with",  # table cells
                 "Layers of the interior", "where chloroplasts", "in their laboratory",  # captions
                 "Physical characteristics", "Early life",  # headings
                 "Outline of Jupiter", "Artificial photosynthesis", "Oreskes",  # back matter
                 "NASA Science", "Polish physicists", "Curie, Marie"):
        assert gone not in text, gone
    assert not re.search(r"^(History|Research|Moons)$", text, flags=re.MULTILINE)


def test_paragraphs_are_separated_by_single_blank_lines(fixture_articles):
    for article in fixture_articles[0]:
        assert article == article.strip()
        paragraphs = article.split("\n\n")
        assert len(paragraphs) > 2
        assert all(p.strip() == p and p for p in paragraphs)
        assert all(line.strip() for p in paragraphs for line in p.split("\n"))


def test_plain_xml_reads_the_same_as_bz2(plain_xml, fixture_articles):
    assert read_all(plain_xml) == fixture_articles


def test_accepts_str_paths(fixture_articles):
    assert read_all(str(FIXTURE)) == fixture_articles


def test_is_a_lazy_generator(plain_xml):
    articles = iter_wiki_articles(plain_xml, collections.Counter())
    assert inspect.isgenerator(articles)
    # Cut the file inside its last page: the first article must still arrive,
    # because nothing past it has been read yet.
    data = plain_xml.read_bytes()
    plain_xml.write_bytes(data[: data.rindex(b"<page>") + 40])
    articles = iter_wiki_articles(plain_xml, collections.Counter())
    assert next(articles).startswith("Jupiter is the fifth planet")
    with pytest.raises(ValueError, match=re.escape(str(plain_xml))):
        list(articles)


def test_uses_latest_revision_and_detects_text_redirects(tmp_path):
    path = tmp_path / "history.xml"
    path.write_text(
        DUMP_HEAD
        + page_xml("Old", revision_xml(1, "First draft."), revision_xml(2, "'''Final''' text."))
        + page_xml("Moved", revision_xml(3, "  #redirect [[Old]]"))
        + page_xml("Talk:Old", revision_xml(4, "Chatter."), ns=1)
        + page_xml("Blank", "<revision><id>5</id><text bytes=\"0\" /></revision>")
        + "</mediawiki>\n",
        encoding="utf-8",
    )
    articles, stats = read_all(path)
    assert articles == ["Final text."]
    assert stats == {"wiki_redirect": 1, "wiki_non_article": 1, "wiki_empty": 1}


def test_check_accepts_real_dumps(plain_xml):
    assert check_wiki_dump(FIXTURE) is None
    assert check_wiki_dump(plain_xml) is None


BAD_FILES = {
    "garbage.xml": b"this is not XML at all\n",
    "empty.xml": b"",
    "html.xml": b"<html><body><p>A web page</p></body></html>",
    "no-siteinfo.xml": b'<mediawiki><page><title>A</title></page></mediawiki>',
    "not-bzip2.xml.bz2": b"<mediawiki>plain text under a .bz2 name</mediawiki>",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_gives_one_clear_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    expected = re.escape(f"{path}: not a readable MediaWiki XML dump: ")
    with pytest.raises(ValueError, match=expected):
        check_wiki_dump(path)
    with pytest.raises(ValueError, match=expected):
        read_all(path)


def test_wrong_root_is_named_in_the_error(tmp_path):
    path = tmp_path / "feed.xml"
    path.write_bytes(b"<rss><channel><title>News</title></channel></rss>")
    with pytest.raises(ValueError, match="root element is not <mediawiki>"):
        check_wiki_dump(path)


def test_truncated_bz2_gives_error_naming_the_file(tmp_path):
    path = tmp_path / "enwiki-cut.xml.bz2"
    data = FIXTURE.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*EOFError"):
        read_all(path)


def test_missing_file_gives_error_naming_the_file(tmp_path):
    path = tmp_path / "absent.xml.bz2"
    with pytest.raises(ValueError, match=re.escape(str(path))):
        check_wiki_dump(path)


def test_errors_raised_by_the_consumer_pass_through_unchanged():
    with pytest.raises(KeyError):
        for _ in iter_wiki_articles(FIXTURE, collections.Counter()):
            raise KeyError("consumer bug")


@pytest.mark.parametrize(("wikitext", "expected"), [
    ("See [[:Category:Moons|the moon list]].[[fr:Jupiter (planète)]]", "See the moon list."),
    ("Line one<br />line two.", "Line one line two."),
    ("Visit https://example.org today.", "Visit today."),
    ("Speeds of {{convert|2|to|5|cm|in}} a year.", "Speeds of 2 to 5 cm a year."),
    ("A {{nowrap|[[light-year|light year]]}} is long.", "A light year is long."),
    ("Text.<ref>Author, ''Book'', p. 4.</ref><ref name=a/> More.{{cn}}", "Text. More."),
    ("Intro.\n\n\n\n== Only a heading ==\n\n\n<!-- note -->\nBody.", "Intro.\n\nBody."),
    ("Lead.\n== See also ==\n* [[Other]]\n=== Deeper ===\nstill skipped\n== Life ==\nKept.",
     "Lead.\n\nKept."),
])
def test_clean_wikitext_cases(wikitext, expected):
    assert clean_wikitext(wikitext) == expected

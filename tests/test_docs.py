"""The README and docs/ pages: short README, every page reachable, every link resolving."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(os.path.join("docs", name) for name in os.listdir(DOCS) if name.endswith(".md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def read(relative):
    with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
        return f.read()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(relative):
    return {github_anchor(line.lstrip("#")) for line in read(relative).splitlines() if line.startswith("#")}


def test_github_anchor_rule():
    assert github_anchor("Robustness at every evaluation: zero-shot on your own shifted sets") == \
        "robustness-at-every-evaluation-zero-shot-on-your-own-shifted-sets"
    assert github_anchor("Fine-tuning with OpenCLIP's trainer") == "fine-tuning-with-openclips-trainer"
    assert github_anchor("The sigmoid m²-Mix term (`--siglip --loss m2mix`)") == \
        "the-sigmoid-m²-mix-term---siglip---loss-m2mix"


def test_readme_is_short():
    assert len(read("README.md").encode("utf-8")) <= 15_000


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(target.split("#")[0]) for target in LINK.findall(read("README.md"))}
    assert PAGES and [page for page in PAGES if os.path.normpath(page) not in linked] == []


@pytest.mark.parametrize("page", ["README.md"] + PAGES)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(read(page)):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        relative = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, relative)):
            broken.append(f"{target}: no file {relative}")
        elif anchor and relative.endswith(".md") and anchor not in anchors(relative):
            broken.append(f"{target}: no heading with anchor #{anchor} in {relative}")
    assert broken == []


# -- every command the README and the docs pages show parses with today's flags -------------------
FENCE = re.compile(r"```(?:bash|sh)?\n(.*?)```", re.S)
TOOLS = ("m2mix-train", "m2mix-data", "m2mix-analyze", "m2mix-wiseft")


def shown_commands():
    """(page, tool, argv) of every tool command in a code block of the README and docs/, with its
    continuation lines joined; synopsis lines (``[--flag ...]``, ``...``) and output lines
    (``m2mix-train: error: ...``) are not commands."""
    import shlex
    found = []
    for page in ["README.md"] + PAGES:
        for block in FENCE.findall(read(page)):
            for command in block.replace("\\\n", " ").splitlines():
                if (not any(tool in command for tool in TOOLS) or "..." in command or "[--" in command
                        or any(f"{tool}:" in command for tool in TOOLS)):  # a synopsis, or a tool's output
                    continue
                words = shlex.split(command, comments=True)
                starts = [i for i, word in enumerate(words) if word in TOOLS and (i == 0 or words[i - 1] == "&&")]
                for start in starts:
                    end = words.index("&&", start) if "&&" in words[start:] else len(words)
                    found.append((page, words[start], words[start + 1:end]))
    return found


def test_the_docs_show_commands_of_every_tool():
    assert {tool for _, tool, _ in shown_commands()} == set(TOOLS)


@pytest.mark.parametrize("page,tool,argv", shown_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_a_shown_command_parses(page, tool, argv):
    """The flags and values a page shows are the installed tool's (the data need not exist)."""
    if tool == "m2mix-train":
        from m2mix_openclip.integration.launcher import parse_args
        parse_args(argv, check_data=False)
        return
    module = {"m2mix-data": "data", "m2mix-analyze": "analyze", "m2mix-wiseft": "wiseft"}[tool]
    import importlib
    importlib.import_module(f"m2mix_openclip.{module}").build_parser().parse_args(argv)

"""The README and docs/ as a newcomer follows them: every relative link leads to a file (and heading) that
is there, and every `resexp ...` command they show composes with this conf/ (train) or names flags its
subcommand has (the others)."""

import re
import shlex
from pathlib import Path

import pytest
from helpers import REPO, compose_config, resexp

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation gone, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def commands() -> list[tuple[str, list[str]]]:
    """Every `resexp SUBCOMMAND ...` of the pages' code blocks (continued lines joined, comments gone),
    and of their inline code where it holds no placeholder (N, DIR, `...`)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        lines = [line for block in FENCE.findall(text) for line in block.replace("\\\n", " ").splitlines()]
        lines += [
            span for span in re.findall(r"`(resexp [^`]+)`", text) if not re.search(r"\.\.\.|\b[A-Z_]{1,}\b", span)
        ]
        for line in lines:  # a command begins a line, or follows `&&` or torchrun's `-m`
            if not (command := re.search(r"(?:^|&& |-m )(resexp [a-z]+.*)$", line.strip())):
                continue
            words = shlex.split(command[1], comments=True)
            if len(words) > 1 and words[0] == "resexp" and re.fullmatch(r"[a-z]+", words[1]):
                found.append((page.name, words[1:]))
    return found


def test_the_pages_show_commands_of_every_kind():
    kinds = {words[0] for _, words in commands()}
    assert {"train", "eval", "export", "report", "analyze", "prepare"} <= kinds


def test_every_train_command_shown_composes():
    for page, words in commands():
        if words[0] != "train" or "--help" in words:
            continue
        # resexp's own flags (--nproc-per-node, -m) and Hydra's own keys are not the config's; a swept
        # value stands for all of its values
        overrides = [word for word in words[1:] if not word.startswith("-") and not word.startswith("hydra")]
        overrides = [re.sub(r"=([^\[,]*),.*$", r"=\1", word) for word in overrides]
        try:
            compose_config(*overrides)
        except Exception as error:
            pytest.fail(f"{page}: resexp {' '.join(words)}: {error}")


def test_every_other_command_shown_names_flags_its_subcommand_has(tmp_path):
    helps = {}
    for page, words in commands():
        if words[0] == "train":
            continue
        if words[0] not in helps:
            result = resexp(words[0], "--help", cwd=tmp_path)
            assert result.returncode == 0, f"{page}: resexp {words[0]} --help: {result.stderr}"
            helps[words[0]] = result.stdout
        unknown = [
            word.split("=")[0] for word in words if word.startswith("--") and word.split("=")[0] not in helps[words[0]]
        ]
        assert not unknown, f"{page}: resexp {' '.join(words)}: {unknown}"

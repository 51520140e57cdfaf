"""The README is the front door: its runnable blocks run, and every relative link of the documentation resolves.

A fenced ``bash`` or ``python`` block of README.md runs in this test when the line right before its
fence is a marker comment::

    <!-- runnable -->                                     the block runs as written
    <!-- runnable: quick="ARGS" expect="PATHS" -->        bash: ARGS appended to every command but ``cd``
                                                          (the quick variant the README states next to it);
                                                          afterwards each of PATHS exists
    <!-- runnable: check="EXPR" -->                       python: afterwards EXPR is true in the block's namespace

Bash blocks run with ``bash -euo pipefail`` from the root of a temporary copy of the repository's tracked
files (their outputs stay there), with ``python`` and ``monai-gradicon`` meaning this interpreter and
the project on ``PYTHONPATH``. Python blocks run in this process, in a fresh namespace, from a temporary
folder. Unmarked blocks are not run; their ``monai-gradicon`` options are checked against the CLI.
"""

from __future__ import annotations

import inspect
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(?P<attrs>.*?))?\s*-->\s*$")
ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')
KEYS = {"bash": {"quick", "expect"}, "python": {"check"}}


def read(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def fenced_blocks(text: str) -> list[dict]:
    """Every fenced block of a Markdown text: ``language``, ``code``, ``line`` (1-based fence line), ``before`` (the line before)."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if match is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"unclosed code fence at line {i + 1}"
        blocks.append(
            {"language": match.group(1), "code": "\n".join(lines[i + 1 : end]) + "\n", "line": i + 1,
             "before": lines[i - 1] if i > 0 else ""}
        )
        i = end + 1
    return blocks


def runnable_blocks(text: str) -> list[dict]:
    """The marked blocks, each with its ``attrs``; a marker on anything but a bash/python fence, or an unknown key, is an error."""
    lines = text.split("\n")
    blocks = fenced_blocks(text)
    starts = {block["line"] - 1: block for block in blocks}  # 1-based fence line -> its 1-based marker line
    found = []
    for number, line in enumerate(lines, start=1):
        match = MARKER.match(line.strip())
        if match is None:
            continue
        block = starts.get(number)
        assert block is not None, f"README.md:{number}: a runnable marker must stand on the line right before a code fence"
        assert block["language"] in KEYS, f"README.md:{number}: runnable block is {block['language']!r}, expected bash or python"
        attrs = dict(ATTRIBUTE.findall(match.group("attrs") or ""))
        unknown = set(attrs) - KEYS[block["language"]]
        assert not unknown, f"README.md:{number}: unknown marker keys {sorted(unknown)} for a {block['language']} block"
        found.append(dict(block, attrs=attrs))
    return found


BLOCKS = runnable_blocks(read(README))


def with_quick_arguments(code: str, quick: str) -> str:
    """Append ``quick`` to every command line of a bash block except ``cd`` (before a trailing ``# comment``)."""
    out = []
    for line in code.split("\n"):
        command, hash_, comment = line.partition("  #")
        if not command.strip() or command.lstrip().startswith(("#", "cd ")) or command.rstrip().endswith("\\"):
            out.append(line)
            continue
        out.append(f"{command.rstrip()} {quick}" + (f"  {hash_[2:]}{comment}" if hash_ else ""))
    return "\n".join(out)


def repository_copy(destination: str) -> None:
    """Copy the tracked files of the repository (a clean clone's content, no weights or build folders) to ``destination``."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = os.path.join(ROOT, name)
        if not os.path.isfile(source):  # deleted in the working tree
            continue
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


def command_shims(folder: str) -> str:
    """A folder with ``python`` (this interpreter) and ``monai-gradicon`` (the CLI module) for the bash blocks."""
    os.makedirs(folder)
    for name, body in (("python", f'exec {shlex.quote(sys.executable)} "$@"'),
                       ("monai-gradicon", f'exec {shlex.quote(sys.executable)} -m monai_gradicon.app.cli "$@"')):
        path = os.path.join(folder, name)
        with open(path, "w") as file:
            file.write(f"#!/usr/bin/env bash\n{body}\n")
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return folder


def test_readme_marks_runnable_blocks_including_the_monai_pipeline():
    languages = [block["language"] for block in BLOCKS]
    assert "bash" in languages and "python" in languages, f"runnable README blocks: {languages}"
    mixin = [b for b in BLOCKS if b["language"] == "python" and "GradICONLoss" in b["code"] and "monai.networks" in b["code"]]
    assert mixin, "the README block that mixes GradICONLoss into a MONAI pipeline must be marked runnable"
    assert all(b["attrs"].get("check") for b in BLOCKS if b["language"] == "python"), "each runnable python block states a check"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b['line']}-{b['language']}" for b in BLOCKS])
def test_runnable_readme_block(block, tmp_path, monkeypatch):
    if block["language"] == "python":
        monkeypatch.chdir(tmp_path)
        torch.manual_seed(0)  # blocks may draw from torch's global generator
        namespace: dict = {"__name__": "__readme__"}
        exec(compile(block["code"], f"README.md:{block['line']}", "exec"), namespace)
        assert eval(block["attrs"]["check"], namespace), f"README.md:{block['line']}: {block['attrs']['check']} is false"
        return
    copy = tmp_path / "repo"
    repository_copy(str(copy))
    env = dict(os.environ)
    env["PATH"] = command_shims(str(tmp_path / "bin")) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = with_quick_arguments(block["code"], block["attrs"]["quick"]) if "quick" in block["attrs"] else block["code"]
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README.md:{block['line']} failed ({result.returncode}):\n{code}\n{result.stderr[-3000:]}"
    missing = [p for p in block["attrs"].get("expect", "").split() if not (copy / p).exists()]
    assert not missing, f"README.md:{block['line']}: not written: {missing}"


def test_quick_arguments_go_before_comments_and_skip_cd():
    code = "cd bundles/x\npython -m monai.bundle run --config_file a.json   # writes b\n# a comment\n"
    assert with_quick_arguments(code, "--epochs 1") == (
        "cd bundles/x\npython -m monai.bundle run --config_file a.json --epochs 1  # writes b\n# a comment\n"
    )


def markdown_pages() -> list[str]:
    return [README] + sorted(os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats)."""
    anchors: set[str] = set()
    for block in fenced_blocks(text):  # headings inside code blocks are not headings
        text = text.replace(block["code"], "")
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images outside code (absolute URLs left out)."""
    for block in fenced_blocks(text):
        text = text.replace(block["code"], "")
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    text = read(page)
    broken = []
    for target in relative_links(text):
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(file):
            broken.append(f"{target} (no file {os.path.relpath(file, ROOT)})")
        elif anchor and file.endswith(".md") and anchor not in heading_anchors(read(file)):
            broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(file, ROOT)})")
    assert not broken, f"{os.path.relpath(page, ROOT)}: broken links: {broken}"


def test_readme_links_every_docs_page():
    linked = {os.path.normpath(t.partition("#")[0]) for t in relative_links(read(README))}
    pages = {os.path.join("docs", name) for name in os.listdir(DOCS) if name.endswith(".md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_ci_reads_the_readme_test_command_and_the_main_command_stays():
    """``.ci/run`` extracts the block after ``<!-- test-command -->`` with awk; that block and the main command exist."""
    ci = read(os.path.join(ROOT, ".ci", "run"))
    awk = re.search(r"cmd=\$\(awk '([^']+)' README\.md\)", ci)
    assert awk is not None, ".ci/run no longer extracts the README test command with awk"
    extracted = subprocess.run(["awk", awk.group(1), "README.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    blocks = {b["before"].strip(): b for b in fenced_blocks(read(README))}
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        assert marker in blocks and blocks[marker]["language"] == "bash", f"no ```bash block right after {marker}"
    assert extracted.strip() and extracted == blocks["<!-- test-command -->"]["code"]
    assert "monai.bundle run --config_file configs/train.json" in blocks["<!-- main-command -->"]["code"]


def cli_invocations(code: str) -> list[tuple[str, list[str]]]:
    """``(subcommand, [options])`` of every ``monai-gradicon`` command in a bash block (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", code)
    calls = []
    for line in joined.split("\n"):
        line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]  # comments name commands, they do not run them
        for match in re.finditer(r"(?:^|[;&|]\s*)monai-gradicon\s+([a-z][a-z0-9-]*)(.*?)(?=[;&|]|$)", line.strip()):
            calls.append((match.group(1), re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", match.group(2))))
    return calls


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_documented_cli_options_exist(page):
    from monai_gradicon.app.cli import Commands

    wrong = []
    for block in fenced_blocks(read(page)):
        if block["language"] != "bash":
            continue
        for command, options in cli_invocations(block["code"]):
            method = getattr(Commands, command.replace("-", "_"), None)
            if method is None or command.startswith("_"):
                wrong.append(f"monai-gradicon {command} (no such command)")
                continue
            parameters = set(inspect.signature(method).parameters) - {"self"}
            wrong += [f"monai-gradicon {command} --{o}" for o in options if o.replace("-", "_") not in parameters]
    assert not wrong, f"{os.path.relpath(page, ROOT)} documents what the CLI does not have: {wrong}"


def test_readme_weights_table_matches_the_bundles():
    """Each released model's row in the README links the URL that its bundle's ``large_files.yml`` names."""
    from monai_gradicon.app.model import BUNDLE_ALIASES

    rows = dict(re.findall(r"^\| `(\w+)` \|[^\n]*\]\((https://[^)]+)\) \|$", read(README), flags=re.MULTILINE))
    assert set(rows) == set(BUNDLE_ALIASES), f"README weights table rows {sorted(rows)}, bundles {sorted(BUNDLE_ALIASES)}"
    for alias, folder in BUNDLE_ALIASES.items():
        urls = re.findall(r'url:\s*"([^"]+)"', read(os.path.join(ROOT, "bundles", folder, "large_files.yml")))
        assert rows[alias] in urls, (alias, rows[alias], urls)

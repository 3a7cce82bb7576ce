"""The documents' commands and links: every documented `python X.py ...` parses, every link resolves.

Reads each fenced shell block (```bash, ```sh, ```shell, ```console or a bare ```) of README.md,
PRETRAIN_GUIDE.md, CHANGELOG.md and docs/*.md, joins backslash-continued lines, and finds the
commands of our scripts: `python X.py ...`, `python -m torch.distributed.run ... X.py ...`,
`torchrun ... X.py ...`, also behind `srun ...`, `VAR=value` prefixes or `for ...; do`; also code spans that start with `python ` or
`torchrun ` (the commands of tables and prose). For each,
X.py must be a top-level script and its flags must parse with that script's own parser, for real
(types, choices, required options), but nothing else runs: the parser is taken from the script's
`main` at the moment main asks it to parse, and main is stopped there. Options that run_all.py and
ablation.py pass on (to run_all.py and train.py) are parsed by the parsers they go to.

Placeholders are fine as values (`<path>`, `$DATA`); `VAR=...` assignments and `for VAR in a b`
loops of the same block are expanded; a literal `...` means "options left out", so required
options are not demanded then. `python -c CODE` is checked for its imports (a moved module shows
there). Commands of other programs are skipped.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import io
import re
import shlex
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "PRETRAIN_GUIDE.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# Where the options a script does not know itself go (its help says so); the rest is an error.
PASSES_ON = {"run_all.py": ("train.py",), "ablation.py": ("run_all.py", "train.py")}
LAUNCHERS = {"torch.distributed.run", "torch.distributed.launch"}
SEPARATORS = {";", "&&", "||", "|", "&", ";;"}
SHELL_WORDS = {"do", "then", "else", "time", "exec", "nohup", "sudo"}
PYTHON = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
PLACEHOLDER = re.compile(r"<([A-Za-z][^<>|;&\n]*)>")   # <path>, <folder of images>: a value, not a redirection
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


# --------------------------------------------------------------------------------------------
# Reading the documents
# --------------------------------------------------------------------------------------------
def existing_documents() -> list[Path]:
    return [p for p in DOCUMENTS if p.is_file()]


def shell_blocks(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, body) of each fenced block whose language is a shell (or none)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        marker, language = fence.group(1), fence.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(marker)), len(lines))
        if language in SHELL_FENCES:
            yield i + 2, "\n".join(lines[i + 1:end])
        i = end + 1


def logical_lines(body: str) -> Iterator[str]:
    """The block's lines with backslash continuations joined."""
    yield from re.sub(r"\\\n", " ", body).splitlines()


def split_words(line: str) -> list[str]:
    line = re.sub(r"(?<=\s)\d+(?=[<>])", "", line)   # the 2 of 2>&1: part of the redirection
    line = PLACEHOLDER.sub(lambda m: "PLACEHOLDER_" + re.sub(r"\W", "_", m.group(1)), line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:   # an unclosed quote: not a command this test can read
        return []


def segments(words: list[str]) -> Iterator[list[str]]:
    """Simple commands: split at ; && || | &, redirections (> file, 2> file) dropped."""
    current: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in SEPARATORS:
            yield current
            current = []
        elif word and set(word) <= set("<>&"):
            skip_next = True                       # > file, >&1, &> file: the target goes too
        else:
            current.append(word)
    yield current


def expand(words: list[str], variables: dict[str, str]) -> list[str]:
    """$VAR of an assignment of the block: a whole-word $VAR splits like the shell does."""
    out: list[str] = []
    for word in words:
        whole = VARIABLE.fullmatch(word)
        if whole and whole.group(1) in variables:
            out += variables[whole.group(1)].split()
        else:
            out.append(VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), word))
    return out


def learn_variables(words: list[str], variables: dict[str, str]) -> None:
    """Record VAR=value (alone on a segment) and `for VAR in first ...` (bound to the first)."""
    if words and words[0] == "for" and len(words) > 3 and words[2] == "in":
        variables[words[1]] = words[3]
    elif words and all(ASSIGNMENT.match(w) for w in words):
        for word in words:
            name, value = ASSIGNMENT.match(word).groups()
            variables[name] = " ".join(expand(value.split(), variables))


def inline_commands(text: str) -> Iterator[tuple[int, str]]:
    """(line number, code) of each `python ...` or `torchrun ...` code span outside the blocks
    (the commands of tables and prose)."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"^\s*(```|~~~)", line):
            in_fence = not in_fence
        elif not in_fence:
            for span in re.findall(r"`([^`]+)`", line):
                if re.match(r"^(python3?|torchrun) ", span):
                    yield number, span.replace("\\|", "|")


def commands(document: Path) -> Iterator[tuple[str, list[str]]]:
    """(where, words from the python/torchrun word on) for every command that runs Python."""
    text = document.read_text(encoding="utf-8")
    name = document.relative_to(ROOT) if ROOT in document.parents else document
    for number, span in inline_commands(text):
        for words in segments(split_words(span)):
            if python_command(words):
                yield f"{name}, line {number}: {span}", python_command(words)
    for first_line, body in shell_blocks(text):
        variables: dict[str, str] = {}
        for offset, line in enumerate(logical_lines(body)):
            for words in segments(split_words(line)):
                learn_variables(words, variables)
                command = python_command(words)
                if command:
                    where = f"{name}, block at line {first_line}: {line.strip()}"
                    yield where, expand(command, variables)


def python_command(words: list[str]) -> list[str]:
    """The words from the python (or torchrun) word on; [] when the command runs neither."""
    start = next((k for k, w in enumerate(words) if PYTHON.match(w) or w == "torchrun"), None)
    return [] if start is None else words[start:]


# --------------------------------------------------------------------------------------------
# Checking one command
# --------------------------------------------------------------------------------------------
class _ParserCaught(Exception):
    """Raised instead of parsing: carries the parser a script's main asked to parse with."""

    def __init__(self, parser: argparse.ArgumentParser, known_only: bool) -> None:
        super().__init__()
        self.parser, self.known_only = parser, known_only


@functools.lru_cache(maxsize=None)
def script_parser(script: str) -> tuple[argparse.ArgumentParser, bool] | None:
    """The first parser the script's main parses with, and whether it keeps unknown options
    (parse_known_args); None for a script without main (it takes no options)."""
    module = importlib.import_module(script[:-3])
    if not callable(getattr(module, "main", None)):
        return None

    def parse_args(self, args=None, namespace=None):
        raise _ParserCaught(self, known_only=False)

    def parse_known_args(self, args=None, namespace=None):
        raise _ParserCaught(self, known_only=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
        try:
            module.main([])
        except _ParserCaught as caught:
            caught.parser.prog = script      # error lines name the script, not pytest
            return caught.parser, caught.known_only
    raise AssertionError(f"{script}: main() returned without parsing its command line")


def parse_only(parser: argparse.ArgumentParser, argv: list[str], elided: bool) -> tuple[list[str], str]:
    """Parse argv for real; (the words the parser did not know, the error message or '')."""
    saved = [(action, action.required) for action in parser._actions]
    if elided:   # `...` stands for options left out: the required ones may be among them
        for action, _ in saved:
            action.required = False
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            _, unknown = parser.parse_known_args(argv)
        return unknown, ""
    except SystemExit as exc:
        if exc.code in (0, None):       # --help
            return [], ""
        return [], stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else "exit"
    finally:
        for action, required in saved:
            action.required = required


def check_script(script: str, argv: list[str]) -> str:
    """'' when `python script argv` would get past its parsing, else why not."""
    if "/" in script or not (ROOT / script).is_file():
        return f"{script} is not a script at the top of the repository"
    elided = "..." in argv
    argv = [w for w in argv if w != "..."]
    found = script_parser(script)
    if found is None:
        return f"{script} takes no options: {' '.join(argv)}" if argv else ""
    parser, known_only = found
    unknown, error = parse_only(parser, argv, elided)
    for downstream in PASSES_ON.get(script, ()) if known_only else ():
        if error or not unknown:
            break
        unknown, error = parse_only(script_parser(downstream)[0], unknown, elided=True)
    if error:
        return error
    return f"unrecognized arguments: {' '.join(unknown)}" if unknown else ""


def check_inline_code(code: str) -> str:
    """`python -c CODE`: it compiles, and what it imports exists (modules move)."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return f"python -c does not compile: {exc}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "", alias.name) for alias in node.names]
        else:
            continue
        for module_name, attribute in names:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                return f"python -c imports {module_name}: {exc}"
            if attribute and not hasattr(module, attribute):
                return f"python -c imports {attribute} from {module_name}, which has no such name"
    return ""


def check_command(words: list[str]) -> str:
    """'' if the command (from its python/torchrun word on) is fine or not ours, else the problem."""
    if words[0] == "torchrun":
        return check_launched(words[1:])
    rest = words[1:]
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
        rest = rest[1:]                 # python's own options (-u, -O, ...)
    if not rest:
        return ""
    if rest[0] == "-c":
        return check_inline_code(rest[1]) if len(rest) > 1 else "python -c without code"
    if rest[0] == "-m":
        return check_launched(rest[2:]) if len(rest) > 1 and rest[1] in LAUNCHERS else ""
    return check_script(rest[0], rest[1:]) if rest[0].endswith(".py") else ""


def check_launched(words: list[str]) -> str:
    """torchrun's (or torch.distributed.run's) options, then the script and its options."""
    script = next((k for k, w in enumerate(words) if w.endswith(".py") and not w.startswith("-")), None)
    if script is None:
        return "" if "..." in words else "torchrun without a script"
    return check_script(words[script], words[script + 1:])


def documented_commands() -> list[tuple[str, list[str]]]:
    return [found for document in existing_documents() for found in commands(document)]


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    in_fence = False
    for line in document.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not in_fence:
            slug = github_anchor(heading.group(1))
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def link_targets(document: Path) -> Iterator[str]:
    text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    yield from LINK.findall(text)


def broken_link(document: Path, target: str) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):    # http:, https:, mailto:
        return ""
    path_part, _, anchor = target.partition("#")
    path = (document.parent / path_part).resolve() if path_part else document
    if ROOT not in path.parents and path != ROOT:
        return "points outside the repository"
    if not path.exists():
        return "no such file"
    if anchor and path.suffix == ".md" and anchor not in anchors(path):
        return f"no heading #{anchor} in {path.relative_to(ROOT)}"
    return ""


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_the_documents_are_there():
    names = {p.relative_to(ROOT).as_posix() for p in existing_documents()}
    assert {"README.md", "PRETRAIN_GUIDE.md"} <= names
    assert len(documented_commands()) > 50, "the command reader found almost nothing: is it broken?"


def test_every_documented_command_parses():
    problems = [f"{where}\n    -> {problem}" for where, words in documented_commands()
                if (problem := check_command(words))]
    assert not problems, "documented commands that would not start:\n" + "\n".join(problems)


def test_documented_commands_cover_the_main_scripts():
    used = {w for _, words in documented_commands() for w in words if w.endswith(".py")}
    assert {"train.py", "run_all.py", "pretrain_imagenet.py", "pretrain_spark.py", "prune.py",
            "summarize_runs.py", "plot_results.py", "datasets.py", "compute_flops.py"} <= used


@pytest.mark.parametrize("line, complaint", [
    ("python train.py --dataset synthtex --no_such_flag 3", "unrecognized arguments: --no_such_flag"),
    ("python train.py --epochs three", "invalid int value"),
    ("python nosuch.py --epochs 3", "not a script"),
    ("python helpers/synthtex.py", "not a script"),
    ("python run_all.py --dataset synthtex --models twistnet18 --no_such_flag 1", "--no_such_flag"),
    ("python ablation.py --dataset synthtex --no_such_flag 1", "--no_such_flag"),
    ("python run_all.py --models twistnet18", "required: --dataset"),
    ("torchrun --standalone --nproc_per_node=2 pretrain_spark.py --mask_ratio", "expected one argument"),
    ("python -m torch.distributed.run --nproc_per_node 2 pretrain_imagenet.py --lr_typo 1", "--lr_typo"),
    ("python models.py --model twistnet18", "takes no options"),
    ("python -c \"from synthtex import render_synthtex\"", "synthtex"),
])
def test_the_checker_fails_on_a_bad_command(line, complaint):
    (words,) = [python_command(w) for w in segments(split_words(line)) if python_command(w)]
    problem = check_command(words)
    assert complaint in problem, problem


@pytest.mark.parametrize("line", [
    "python train.py --dataset synthtex --model twistnet18 --epochs 3 --img_size 64 --run_dir runs/demo",
    "python run_all.py ... --gpus 0,1,2,3 --runs_per_gpu 2",
    "python run_all.py --dataset dtd --data_dir $DATA --models twistnet18 --folds 1-3 --lr 0.05 --mixup 0",
    "python ablation.py --dataset synthtex --folds 1 --run_dir <dir> --img_size 32 --jobs 2 --mixup 0",
    "srun --ntasks 2 python pretrain_imagenet.py --data_dir /data/imagenet --batch_size 64 > log.txt 2>&1",
    "python -c \"from helpers.synthtex import render_synthtex\"",
    "python -m pytest -q tests/test_docs.py",
    "python prune.py --checkpoint <run dir>/best.pt --percent 0.3 --out <file>",
])
def test_the_checker_passes_a_good_command(line):
    (words,) = [python_command(w) for w in segments(split_words(line)) if python_command(w)]
    assert check_command(words) == ""


def test_block_variables_and_loops_are_expanded(tmp_path):
    document = tmp_path / "x.md"
    document.write_text("```bash\nCOMMON=\"--dataset synthtex --img_size 32\"\nfor P in 30 50; do\n"
                        "    python prune.py --checkpoint x.pt --percent 0.$P $COMMON_NOT_SET\n"
                        "    python train.py $COMMON --epochs 2  # a comment\ndone\n```\n")
    found = [(words, check_command(words)) for _, words in commands(document)]
    assert found[0][0][:6] == ["python", "prune.py", "--checkpoint", "x.pt", "--percent", "0.30"]
    assert found[1][0] == ["python", "train.py", "--dataset", "synthtex", "--img_size", "32", "--epochs", "2"]
    assert found[1][1] == ""
    assert "unrecognized arguments: $COMMON_NOT_SET" in found[0][1]


def test_every_relative_link_resolves():
    problems = [f"{doc.relative_to(ROOT)}: ({target}) {why}" for doc in existing_documents()
                for target in link_targets(doc) if (why := broken_link(doc, target))]
    assert not problems, "\n".join(problems)


def test_the_link_checker_catches_broken_links():
    assert broken_link(ROOT / "README.md", "docs/NO_SUCH_FILE.md") == "no such file"
    assert broken_link(ROOT / "README.md", "../outside.md") == "points outside the repository"
    assert "no heading" in broken_link(ROOT / "README.md", "#no-such-heading-anywhere")
    assert broken_link(ROOT / "README.md", "https://example.org/x") == ""

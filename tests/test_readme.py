"""The README as a user reads it: every fenced block is closed, every `python -m caap ...` command composes
(sweeps job by job), and every option of the report's command line is documented."""

from __future__ import annotations

import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from caap.config import register_schemas
from caap.paths import CONF_DIR, REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
CONFIGS = {"caap": "config", "caap.train": "train"}  # entry point -> its primary config
FLAGS = {"-m", "--multirun", "--help", "-h"}
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}


def fenced_blocks(text: str) -> list[tuple[int, int, str]]:
    """(first line, last line, info string) of each fenced code block; a fence with an info string (```bash)
    inside an open block, or a block left open at the end, is an unclosed block."""
    blocks, start, info = [], None, ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^ {0,3}(`{3,}|~{3,})(.*)$", line)
        if not fence:
            continue
        if start is None:
            start, info = number, fence.group(2).strip()
        elif fence.group(2).strip():
            raise AssertionError(
                f"README line {number}: '{line}' opens a block inside the one of line {start}"
            )
        else:
            blocks.append((start, number, info))
            start = None
    if start is not None:
        raise AssertionError(f"README: the block opened on line {start} is never closed")
    return blocks


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command line) of the shell blocks (continuations joined) and of the inline code spans."""
    lines = text.splitlines()
    found: list[tuple[int, str]] = []
    for start, end, info in fenced_blocks(text):
        if info not in ("bash", "sh", "shell", "console"):
            continue
        pending, first = "", 0
        for number in range(start + 1, end):
            line = lines[number - 1]
            pending, first = (pending + " " + line.rstrip("\\"), first or number)
            if not line.endswith("\\"):
                found.append((first, pending.strip()))
                pending, first = "", 0
    inside = {n for start, end, _ in fenced_blocks(text) for n in range(start, end + 1)}
    for number, line in enumerate(lines, 1):
        if number not in inside:
            found += [(number, span) for span in re.findall(r"`(python -m caap[^`]*)`", line)]
    return found


def caap_commands(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, entry point, arguments) of every `python -m caap[.train] ...` in the README."""
    commands = []
    for number, line in shell_lines(text):
        if "python -m caap" not in line:
            continue
        tokens = shlex.split(line, comments=True)
        segments: list[list[str]] = [[]]
        for token in tokens:
            if token in ("&&", "||", ";", "|"):
                segments.append([])
            else:
                segments[-1].append(token)
        for segment in segments:
            for i in range(len(segment) - 2):
                if segment[i] == "python" and segment[i + 1] == "-m" and segment[i + 2] in CONFIGS:
                    commands.append((number, segment[i + 2], segment[i + 3 :]))
    return commands


def jobs_of(arguments: list[str]) -> list[list[str]]:
    """The override lists of the jobs a command runs: one for a plain run, one per combination of the sweep
    values for `-m` (Hydra's basic sweeper's expansion); flags are left out."""
    overrides, skip = [], False
    for arg in arguments:
        if skip:
            skip = False
        elif arg in FLAGS_WITH_VALUE:
            skip = True
        elif arg.startswith("-"):
            assert arg in FLAGS, f"unknown flag {arg}"
        else:
            overrides.append(arg)
    parsed = OverridesParser.create().parse_overrides(overrides)
    if not any(o.is_sweep_override() for o in parsed):
        return [overrides]
    return BasicSweeper.split_arguments(parsed, None)[0]


def test_every_fenced_block_of_the_readme_is_closed() -> None:
    blocks = fenced_blocks(README)
    assert len(blocks) >= 10
    with pytest.raises(AssertionError, match="opens a block inside"):  # the check sees a missing close
        fenced_blocks("```bash\npython -m caap\n\ntext\n```bash\nls\n```\n")
    with pytest.raises(AssertionError, match="never closed"):
        fenced_blocks("```\ncode\n")


def test_every_caap_command_of_the_readme_composes() -> None:
    """Each job of each command composes with Hydra's compose API, as `python -m caap ... --cfg job` would.
    No command needs substitution: composing does not open the paths they name (data.root, weights, resume)."""
    register_schemas()
    commands = caap_commands(README)
    assert len(commands) >= 40 and {entry for _, entry, _ in commands} == set(CONFIGS)
    jobs = {
        (entry, tuple(job)): number for number, entry, arguments in commands for job in jobs_of(arguments)
    }
    assert len(jobs) > len(commands)  # the sweeps compose job by job
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for (entry, job), number in jobs.items():
            try:  # hydra.* overrides are checked too: the hydra node composes with the job's config
                compose(CONFIGS[entry], overrides=list(job))
            except Exception as err:
                where = f"README line {number}: python -m {entry} {shlex.join(job)}"
                raise AssertionError(f"{where}: {err}") from err


def test_every_report_option_is_documented(capsys) -> None:
    from caap.report.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    options = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)) - {"--help"}
    assert {"--no-wandb", "--out", "--rank-by"} <= options
    missing = sorted(o for o in options if f"`{o}" not in README)
    assert not missing, f"python -m caap.report options not in the README: {missing}"


def method_options_with_a_choice() -> set[str]:
    """Top-level keys of conf/method/*.yaml whose comment (continuation comment lines included) lists choices
    separated by ` | `."""
    options: set[str] = set()
    for path in sorted((CONF_DIR / "method").glob("*.yaml")):
        key, comment = None, ""
        for line in [*path.read_text().splitlines(), ""]:
            continued = re.match(r"\s+#(.*)", line)
            if key is not None and continued:
                comment += continued.group(1)
                continue
            if key is not None and " | " in comment:
                options.add(key)
            started = re.match(r"([a-z_]+):[^#]*#(.*)", line)
            key, comment = (started.group(1), started.group(2)) if started else (None, "")
    return options


def test_every_method_option_with_a_choice_is_documented() -> None:
    options = method_options_with_a_choice()
    assert {"masked_value", "distance", "head_fusion", "libragrad"} <= options  # the parser sees them
    docs = README + "".join(p.read_text() for p in sorted((REPO_ROOT / "docs").glob("*.md")))
    missing = sorted(key for key in options if f"`method.{key}" not in docs)
    assert not missing, f"conf/method options with a choice that README.md / docs/ never name: {missing}"

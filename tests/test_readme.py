"""The README documents every flag of the programs, and its commands use only flags that exist."""

import re

import pytest
from support import ROOT, run_python

# How a README command names the program -> how to run it.
PROGRAMS = {
    "prepare_fineweb.py": ["prepare_fineweb.py"],
    "train.py": ["train.py"],
    "eval_hellaswag.py": ["eval_hellaswag.py"],
    "gpt2.evaluate": ["-m", "gpt2.evaluate"],
    "gpt2.sample": ["-m", "gpt2.sample"],
}
pytestmark = pytest.mark.slow  # runs each program's --help

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


@pytest.fixture(scope="module")
def help_flags() -> dict[str, set[str]]:
    flags = {}
    for program, command in PROGRAMS.items():
        result = run_python(*command, "--help")
        assert result.returncode == 0, result.stderr
        flags[program] = set(FLAG.findall(result.stdout)) - {"--help"}
    return flags


def readme_commands() -> list[str]:
    """Each command line in the README's shell blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("#")[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_every_flag_is_documented(help_flags):
    readme = (ROOT / "README.md").read_text()
    for program, flags in help_flags.items():
        missing = sorted(f for f in flags if f"`{f}" not in readme and f" {f}" not in readme and f"[{f}" not in readme)
        assert not missing, f"{program} flags missing from README.md: {missing}"


def test_readme_commands_use_real_flags(help_flags):
    checked = 0
    for command in readme_commands():
        for program in PROGRAMS:
            if program in command.split():
                used = set(FLAG.findall(command.split(program, 1)[1]))
                assert used <= help_flags[program], f"{command!r} uses unknown flags {used - help_flags[program]}"
                checked += 1
    assert checked >= 4


def test_make_targets_in_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"make ([\w-]+)", (ROOT / "README.md").read_text())):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README mentions `make {target}`, Makefile lacks it"


def test_troubleshooting_quotes_errors_the_code_prints():
    """Each error quoted in the README's troubleshooting list (``…`` standing for the variable parts) is spelled
    as the code spells it."""
    section = (ROOT / "README.md").read_text().split("## Troubleshooting", 1)[1]
    source = "".join(path.read_text() for path in (ROOT / "gpt2").glob("*.py"))
    source = re.sub(r'"\s*\n\s*f?"', "", source)  # join implicitly concatenated string literals
    quotes = re.findall(r"\*\*`([^`]+)`\*\*", section)
    assert len(quotes) >= 6
    for quote in quotes:
        for fragment in quote.removeprefix("error: ").split("…"):
            assert fragment.strip() in source, f"README quotes {quote!r}; the code has no {fragment.strip()!r}"

"""CI runs exactly the README's test command."""
from conftest import ROOT


def readme_command(marker):
    text = (ROOT / "README.md").read_text()
    block = text.split(marker, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = readme_command("<!-- test-command -->")
    assert len(command) == 1
    assert command[0] in ci

"""docs/cli.md and docs/api.md are generated; the committed files must match the scripts.

A failure means a parser option or a docstring changed after the reference was written:
rerun the command the message names and commit the regenerated file.
"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    path = ROOT / "docs" / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, doc", [("cli_reference", "docs/cli.md"),
                                       ("api_reference", "docs/api.md")])
def test_reference_is_current(name, doc):
    script = _script(name)
    expected = script.render()
    committed = (ROOT / doc).read_text(encoding="utf-8")
    assert committed == expected, (
        f"{doc} is stale (a parser option or docstring changed since it was generated): "
        f"run `python docs/scripts/{name}.py` and commit {doc}")


def test_cli_reference_lists_every_option():
    from errprop.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    subs = _script("cli_reference")._subcommands(build_parser())
    assert set(subs) >= {"demo", "analyze", "budget", "allocate", "compare", "sweep"}
    for name, (parser, _) in subs.items():
        assert f"## `errprop {name}`" in text
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in text, f"errprop {name} {flag} missing from docs/cli.md"


def test_api_reference_lists_every_public_name():
    import errprop

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name in errprop.__all__:
        assert f"### `errprop.{name}`" in text, f"errprop.{name} missing from docs/api.md"

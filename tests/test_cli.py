"""The ``convlens`` parser imports only the module that registers the named sub-command (start-up cost), while
``--help`` and an unknown command still see every command; :data:`flows.cli.COMMAND_OWNERS` stays in step with
what the modules register."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Modules a light command must not pull in: other stages, the report, Prefect.
HEAVY = ("tasks.attribution", "tasks.neurons", "tasks.index", "tasks.maps", "reports", "prefect", "torch",
         "flows.audit", "flows.neurons", "flows.report", "flows.extract_features")

# Runs the CLI in a fresh interpreter, then prints the top-level names of every module it imported.
_WRAPPER = """
import json, sys
from flows.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
print("MODULES=" + json.dumps({"rc": rc, "modules": sorted(sys.modules)}))
"""


def _run_cli_and_list_modules(*argv: str) -> tuple[int, set[str], str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("MODULES=")), None)
    assert line is not None, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(line[len("MODULES="):])
    return data["rc"], set(data["modules"]), r.stdout + r.stderr


def _loaded(modules: set[str], package: str) -> bool:
    return package in modules or any(m.startswith(package + ".") for m in modules)


def test_command_owners_match_what_the_modules_register():
    from flows.cli import COMMAND_MODULES, COMMAND_OWNERS

    registered: dict[str, str] = {}
    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        for command in sub.choices:
            assert command not in registered, f"{command!r} registered by {registered.get(command)} and {name}"
            registered[command] = name
    assert registered == COMMAND_OWNERS, "update flows.cli.COMMAND_OWNERS to what the modules register"


@pytest.mark.parametrize(("argv", "command"), [
    ([], None),
    (["extract", "data"], "extract"),
    (["-v", "--no-prefect", "extract", "data"], "extract"),
    (["-vv", "--prefect", "info", "--json"], "info"),
    (["--verbose", "info"], "info"),
    (["-h", "info"], None),          # help of the top-level parser: all commands
    (["--help"], None),
    (["-vh", "info"], None),
    (["--no-pref", "info"], None),    # an abbreviation: leave it to argparse with the full parser
    (["bogus"], "bogus"),
])
def test_command_named_skips_only_the_light_global_options(argv, command):
    from flows.cli import command_named

    assert command_named(argv) == command


def test_a_named_command_builds_only_its_own_sub_command():
    from flows.cli import COMMAND_OWNERS, build_parser

    def commands(parser: argparse.ArgumentParser) -> set[str]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return set(sub.choices)

    assert commands(build_parser("project")) == {"project", "grid"}
    assert commands(build_parser("info")) == {"info"}
    assert commands(build_parser()) == set(COMMAND_OWNERS)
    assert commands(build_parser("bogus")) == set(COMMAND_OWNERS)


def test_help_and_an_unknown_command_still_list_every_command(capsys):
    from flows.cli import COMMAND_OWNERS, main

    with pytest.raises(SystemExit) as exc:
        main(["--no-prefect", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMAND_OWNERS), out
    with pytest.raises(SystemExit) as exc:
        main(["-v", "nosuchcommand"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nosuchcommand'" in err
    assert all(repr(name) in err for name in COMMAND_OWNERS), err


def test_a_light_command_does_not_import_the_other_stages_or_prefect(tmp_path):
    rc, modules, out = _run_cli_and_list_modules("--no-prefect", "info", "--store", str(tmp_path))
    assert rc == 0, out
    assert "no published artefacts" in out
    assert "flows.info" in modules
    assert [p for p in HEAVY if _loaded(modules, p)] == [], out
    rc, modules, out = _run_cli_and_list_modules("--no-prefect", "info", "--help")
    assert rc == 0 and "--store" in out
    assert [p for p in HEAVY if _loaded(modules, p)] == []


def test_extract_without_prefect_imports_neither_prefect_nor_the_other_stages(color_dataset, store_dir):
    others = [p for p in HEAVY if p not in ("torch", "flows.extract_features")]
    rc, modules, out = _run_cli_and_list_modules("--no-prefect", "extract", "--help")
    assert rc == 0 and "--max-reject-rate" in out
    assert [p for p in others if _loaded(modules, p)] == []
    rc, modules, out = _run_cli_and_list_modules("-v", "--no-prefect", "extract", str(color_dataset), "--store",
                                                 str(store_dir), "--model", "tiny_models:build", "--weights", "none",
                                                 "--num-workers", "0", "--device", "cpu", "--json")
    assert rc == 0, out[-3000:]
    assert '"rows": 24' in out
    assert "flows.extract_features" in modules and "tasks.extract.features" in modules
    assert [p for p in others if _loaded(modules, p)] == [], out[-3000:]


def test_the_extract_flow_and_tasks_are_prefect_objects_on_first_access():
    from prefect import Flow, Task

    import flows.extract_features as fe

    assert isinstance(fe.extract_features, Flow) and fe.extract_features.name == "extract-features"
    assert isinstance(fe.extract_task, Task) and fe.extract_task.name == "extract-features"
    assert isinstance(fe.extract_shard_task, Task) and fe.extract_shard_task.name == "extract-shard"
    assert fe.extract_shard_task.fn.__name__ == "extract_shard_task"  # the Dask key prefix (tests/test_dask.py)
    assert fe.extract_features is fe.extract_features  # built once
    with pytest.raises(AttributeError):
        getattr(fe, "no_such_name")

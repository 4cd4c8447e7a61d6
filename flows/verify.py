"""``convlens verify --store DIR [--json]``: check every artefact of a store against its manifest.

Reads every ``manifest.json`` (refusing a torn, edited or hostile one) and the sha256 and size of every file
each lists. Prints one line per artefact and each problem, and for each bad file the rows it holds (count, and
for a feature part the paths read from the damaged file); exits 0 when everything matches, 1 on any mismatch
(the store must not be trusted until the named artefacts are rebuilt: a features artefact by rerunning
``convlens extract`` on its dataset, which drops the bad part and extracts its rows again), 2 on a usage error.
Read-only: nothing is written or repaired.
"""

from __future__ import annotations

import argparse
from typing import Any

from storage.verify import verify_store

__all__ = ["register", "format_report"]

_SHOWN_PATHS = 5  # paths of a bad part printed per file (all of them are in --json)


def _affected_line(kind: str, a: dict[str, Any]) -> str:
    rows = "an unknown number of" if a.get("rows") is None else str(a["rows"])
    line = f"     affected: {a['file']} ({a['role']}) held {rows} rows"
    if a.get("readable") and a.get("paths"):
        paths = a["paths"]
        more = f", … {len(paths) - _SHOWN_PATHS} more" if len(paths) > _SHOWN_PATHS else ""
        line += f": {', '.join(paths[:_SHOWN_PATHS])}{more} (as read from the damaged file)"
    elif kind == "features" and a["role"] == "part":
        line += " (the damaged file cannot be parsed: no paths)"
    if kind == "features":
        line += "; rerun `convlens extract` on this dataset to repair (the rows are extracted again)"
    return line


def format_report(result: dict[str, Any]) -> str:
    """Human-readable lines for :func:`storage.verify.verify_store`'s result."""
    lines = []
    for a in result["artefacts"]:
        status = "OK" if a["ok"] else "FAIL"
        lines.append(f"{status:4} {a['kind']}/{a['artefact_id']}: {a['status']}, {a['files_checked']} files checked")
        lines += [f"     problem: {p}" for p in a["problems"]]
        lines += [_affected_line(a["kind"], x) for x in a.get("affected", [])]
        lines += [f"     note: {n}" for n in a["notes"]]
    for u in result["unmanifested"]:
        lines.append(f"note {u}: not covered by any manifest (no checksum recorded)")
    verdict = "store OK" if result["ok"] else f"store CORRUPT: {result['problems']} problem(s); rebuild the artefacts marked FAIL"
    lines.append(f"{verdict} — {len(result['artefacts'])} artefacts, {result['files_checked']} files, "
                 f"{result['bytes_checked']} bytes verified in {result['store']}")
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import emit

    result = verify_store(args.store)
    emit(result, args.json, format_report(result))
    return 0 if result["ok"] else 1


def register(sub) -> None:
    from flows.cli import add_store_argument

    p = sub.add_parser("verify", help="check every artefact's files against its manifest's sha256 (exit 1 on mismatch)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_argument(p)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=_cli)


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["verify", *sys.argv[1:]]))

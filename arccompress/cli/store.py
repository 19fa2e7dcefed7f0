"""`arccompress store`: look after a context store: verify, repair, compact, cleanup."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

from ..errors import StoreError
from .options import add_storage_options, positive_int, storage_options

DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
SHOWN_IDS = 20


def duration(text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `0s` as a timedelta."""
    match = DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 7d, 12h, 30m or 0s")
    return timedelta(**{UNITS[match.group(2)]: float(match.group(1))})


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("store", parents=[common], help="look after a context store: verify, repair, compact, cleanup")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text, run in (
        ("verify", "read every row: list each damaged data file with its ids, and damaged indices (exit 2 if any)",
         run_verify),
        ("repair", ("commit a version without the damaged data files and rows, rebuild damaged indices; print the ids "
                    "to compute again"),
         run_repair),
        ("compact", "merge data files, drop shadowed rows, bring the indices up to date", run_compact),
        ("cleanup", "remove old versions (time travel to them ends) and the files only they use", run_cleanup),
    ):
        a = actions.add_parser(name, parents=[common], help=help_text)
        a.add_argument("store", help="the store: a folder, or an s3://, gs://, az:// URI")
        add_storage_options(a)
        a.set_defaults(run=run)
        if name == "verify":
            a.add_argument("--version", type=positive_int, help="verify this version (default: the latest)")
        if name == "repair":
            a.add_argument("--ids-out", help="write the ids to compute again to this file, one per line")
        if name == "cleanup":
            a.add_argument("--older-than", type=duration, default=timedelta(days=7),
                           help="remove versions older than this (default 7d; e.g. 12h, 0s for all but the latest)")


def _open(args: argparse.Namespace, **kwargs):
    from ..store import ContextStore

    if not ContextStore.exists(args.store, storage_options=storage_options(args)):
        raise StoreError(f"no store at {args.store}")
    return ContextStore(args.store, storage_options=storage_options(args), **kwargs)


def run_verify(args: argparse.Namespace) -> int:
    report = _open(args, version=args.version).verify()
    for damage in report.damaged:
        print(damage)
        _print_ids(damage.ids or [], "verify")
    for index in report.indices:
        print(index)
    for problem in (report.history, report.conversion):
        if problem:
            print(problem)
    if not report.ok:
        s = "s" if len(report.damaged) != 1 else ""
        indices = (f" and {len(report.indices)} damaged index(es)" if report.indices else "") + \
            (", newer versions lost" if report.history else "") + (", a stopped conversion" if report.conversion else "")
        raise StoreError(f"{report.store}: {len(report.damaged)} damaged data file{s}{indices} at version "
                         f"{report.version} (of {report.fragments} data files); run `arccompress store repair "
                         f"{report.store}`")
    print(f"{report.store}: version {report.version}, {report.fragments} data files, {report.rows:,} rows: every row "
          "reads and matches its checksum")
    return 0


def run_repair(args: argparse.Namespace) -> int:
    store = _open(args)
    report = store.verify()
    if report.ok:
        print(f"{report.store}: nothing to repair (version {report.version})")
        return 0
    result = store.repair(report)
    ids = result["ids"]
    files = sum(d.offsets is None for d in report.damaged)
    rows = sum(len(d.offsets) for d in report.damaged if d.offsets is not None)
    print(f"removed {files} damaged data file{'' if files == 1 else 's'} and {rows} damaged "
          f"row{'' if rows == 1 else 's'} (version {result['version']}); {len(ids)} ids to compute again (a resumed "
          "`arccompress compress` does)" +
          (f", and {result['unknown_rows']} rows whose ids could not be read" if result["unknown_rows"] else "") +
          (f"; rebuilt {len(report.indices)} damaged index(es)" if report.indices else ""))
    if report.history:
        print(f"not repaired (nothing can be): {report.history}")
    _print_ids(ids, "repair" if not args.ids_out else "")
    if args.ids_out:
        with open(args.ids_out, "w", encoding="utf-8") as f:
            f.writelines(f"{key}\n" for key in ids)
    return 0


def _print_ids(ids: list[str], command: str) -> None:
    """The first ids, one per line (repr: any text), and how many more."""
    for key in ids[:SHOWN_IDS]:
        print(f"  {key!r}")
    if len(ids) > SHOWN_IDS:
        print(f"  ... and {len(ids) - SHOWN_IDS} more" + (" (`arccompress store repair --ids-out FILE` lists them all)"
                                                           if command else ""))


def run_compact(args: argparse.Namespace) -> int:
    result = _open(args).compact()
    print(f"compacted {args.store}: {result['fragments_before']} -> {result['fragments']} data files, "
          f"{result['shadowed_rows_dropped']} shadowed rows dropped (version {result['version']})")
    return 0


def run_cleanup(args: argparse.Namespace) -> int:
    result = _open(args).cleanup(older_than=args.older_than)
    print(f"removed {result['versions_removed']} versions and {result['data_files_removed']} data files only they "
          f"used ({result['bytes_removed'] / 1e6:,.2f} MB) from {args.store}")
    return 0

"""``python -m lmc.data download NAME [NAME ...] [--root DIR]``: fetch datasets once before a sweep, so
parallel jobs never race to download them. ``openml:<id>`` fetches an OpenML table
(:mod:`lmc.core.data.tabular`; ``openml:grinsztajn`` the 16 of Grinsztajn et al.'s benchmark)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmc.core.data import DATASETS, download
from lmc.core.data.tabular import download_openml, openml_ids
from lmc.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmc.data", description="Fetch datasets before a sweep.")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("download", help="download a dataset into the data root")
    get.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(DATASETS)}, openml:<id>")
    get.add_argument("--root", default=None, help="data root (default: $DATA_DIR, else ./data)")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            if name.startswith("openml:"):
                for dataset_id in openml_ids(name):
                    print(f"openml:{dataset_id}: ready as {download_openml(dataset_id, args.root)}")
                continue
            root = download(name, args.root)
            print(f"{name}: ready under {root}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

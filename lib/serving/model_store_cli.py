"""Command line for the served model's versions: list them, show which serves, roll back.

    python -m lib.serving.model_store_cli --model-dir apps/sam_med2d/model list
    python -m lib.serving.model_store_cli --model-dir apps/sam_med2d/model active
    python -m lib.serving.model_store_cli --model-dir apps/sam_med2d/model rollback v0002-20261126T151500123456Z
    python -m lib.serving.model_store_cli --model-dir apps/sam_med2d/model rollback base

A running server picks the rolled-back weights up on its next request (inference reloads when the served file
changes). Exit status 2 with a message for an unknown version or a missing folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lib.serving.model_store import ModelStore


def _store(model_dir: str) -> ModelStore:
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"model dir {path} does not exist")
    return ModelStore(path)  # listing and rollback only name versions; the network config is never used here


def _active(store: ModelStore) -> str:
    return str(store.current_version() or "base")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.serving.model_store_cli", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="the app's model_dir (default apps/sam_med2d/model)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every kept version with its metrics; * marks the one that serves")
    sub.add_parser("active", help="the version that serves")
    rollback = sub.add_parser("rollback", help="serve a kept version again ('base': the starting checkpoint)")
    rollback.add_argument("version")
    args = parser.parse_args(argv)
    try:
        store = _store(args.model_dir)
        if args.command == "list":
            active = _active(store)
            print(f"{'':2}{'version':40} {'published_at':26} metrics")
            print(f"{'*' if active == 'base' else ' ':2}{'base':40} {'':26} (starting checkpoint)")
            for meta in store.list_versions():
                mark = "*" if meta.get("version") == active else " "
                metrics = json.dumps(meta.get("metrics", {}), sort_keys=True)
                print(f"{mark:2}{meta.get('version', '?'):40} {meta.get('published_at', ''):26} {metrics}")
        elif args.command == "active":
            print(_active(store))
        else:
            store.rollback(args.version)
            print(f"now serving {_active(store)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

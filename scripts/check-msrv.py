#!/usr/bin/env python3
"""Checks that no dependency of a published crate needs a newer Rust than ours.

Walks `cargo metadata` (all features) from every workspace member along normal and build
dependencies (dev-dependencies do not reach users) and compares each package's
`rust-version` with the workspace's. Exits 1 naming each package that needs more.
"""
import json
import subprocess
import sys


def version(text):
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    meta = json.loads(
        subprocess.check_output(
            ["cargo", "metadata", "--format-version", "1", "--all-features", "--locked"]
        )
    )
    packages = {p["id"]: p for p in meta["packages"]}
    members = meta["workspace_members"]
    ours = {packages[m]["rust_version"] for m in members}
    if len(ours) != 1 or None in ours:
        print(f"workspace members disagree on rust-version: {sorted(map(str, ours))}")
        return 1
    msrv = ours.pop()
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    seen, todo = set(), list(members)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            kinds = {k["kind"] for k in dep["dep_kinds"]}
            if kinds & {None, "build"}:
                todo.append(dep["pkg"])
    too_new = []
    for pid in sorted(seen):
        pkg = packages[pid]
        needed = pkg.get("rust_version")
        if needed and version(needed) > version(msrv):
            too_new.append(f"{pkg['name']} {pkg['version']} needs Rust {needed}")
    if too_new:
        print(f"the workspace states rust-version {msrv}, but:")
        for line in too_new:
            print(f"  {line}")
        return 1
    print(f"rust-version {msrv}: {len(seen)} crates checked, none needs more")
    return 0


if __name__ == "__main__":
    sys.exit(main())

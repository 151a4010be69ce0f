"""Fails unless every `name==version` line of a pip constraints/requirements file is installed.

    python dockerfiles/check_pins.py requirements/gpu.constraints.txt

A local version label (torch 2.13.0+cu130, 2.13.0+cpu) counts as its public version. Used at the end
of the GPU image build, so an image never ships with a version the resolver picked instead of a pin.
"""

import importlib.metadata
import re
import sys


def read_pins(path):
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", name).strip()] = version.strip()
    return pins


def mismatches(pins):
    bad = {}
    for name, want in pins.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or have.split("+")[0] != want:
            bad[name] = (want, have)
    return bad


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    pins = read_pins(argv[1])
    bad = mismatches(pins)
    for name, (want, have) in sorted(bad.items()):
        print(f"{name}: pinned {want}, installed {have or 'nothing'}", file=sys.stderr)
    if not bad:
        print("pins installed: " + ", ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

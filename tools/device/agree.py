#!/usr/bin/env python3
"""Compares two `fape check` tables row by row: the CPU emulator's (staged by stage.sh) and
the GPU's (run.sh). Prints each row's status and rel-L2 on both, and exits 1 when a row passes
on one and not on the other, or appears in only one.

    python3 agree.py EMULATOR_TABLE GPU_TABLE
"""
import sys


def rows(path):
    table = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            # Rows: op (24) backend (9) dtype (5) shape (26), then rel-L2, tolerance, status.
            if len(line) < 70 or line.startswith(("op ", "check:", " ", "=", "(")):
                continue
            key, rest = line[:66].rstrip(), line[66:].split()
            if not rest:
                continue
            status = "pass" if "pass" in rest[:3] else "n/a" if "n/a" in rest[:3] else "FAIL"
            table[key] = (status, rest[0])
    return table


def main():
    emu, gpu = rows(sys.argv[1]), rows(sys.argv[2])
    disagree = 0
    for key in sorted(set(emu) | set(gpu), key=lambda k: (k not in emu, k)):
        e, g = emu.get(key, ("missing", "-")), gpu.get(key, ("missing", "-"))
        mark = "  " if e[0] == g[0] else "!!"
        disagree += e[0] != g[0]
        print(f"{mark} {key:<66} emulator {e[0]:>7} {e[1]:>10}   gpu {g[0]:>7} {g[1]:>10}")
    print(f"agree: {len(set(emu) | set(gpu)) - disagree} rows agree, {disagree} disagree")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())

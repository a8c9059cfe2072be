#!/usr/bin/env python3
"""Median step time and phase times (fp8moe train --phase-times) of metrics.jsonl files.

Usage: phase_table.py NAME=PATH [NAME=PATH ...]
The step time is the median gap between consecutive steps' elapsed_s, from the fourth step on
(the first two steps run eagerly and capture the graph); the phases are medians over the same
steps. Prints a Markdown table.
"""
import json
import sys

KEYS = ["fb_ms", "reduce_ms", "adam_ms", "state_ms", "refresh_ms"]


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main(args):
    print("| run | steps | step ms | tokens/s | " + " | ".join(KEYS) + " |")
    print("| --- " * (4 + len(KEYS)) + "|")
    for arg in args:
        name, path = arg.split("=", 1)
        rows = [json.loads(line) for line in open(path) if '"loss"' in line]
        el = [r["elapsed_s"] for r in rows]
        step = median([(el[i] - el[i - 1]) * 1e3 for i in range(3, len(el))])
        tokens = rows[-1]["tokens_per_s"] * rows[-1]["elapsed_s"] / len(rows)  # per step
        cells = ["%.2f" % median([r[k] for r in rows[3:]]) if k in rows[-1] else "-" for k in KEYS]
        print("| %s | %d | %.2f | %.0f | %s |" % (name, len(rows), step, tokens / step * 1e3,
                                                   " | ".join(cells)))


if __name__ == "__main__":
    main(sys.argv[1:])

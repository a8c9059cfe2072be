"""Rows of benchmark JSON-lines files (plain or .gz) for the results-table scripts beside this one.

read_rows(paths, keep) returns every row for which keep(row) is true and stops with the file and
line of a line that is not JSON, or when the rows come from more than one commit (one run's files
make one table)."""

import gzip
import json
import sys


def read_rows(paths, keep):
    rows = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{number}: not a JSON object ({e.msg})")
                if keep(row):
                    rows.append(row)
    commits = sorted({str(r.get("commit")) for r in rows})
    if len(commits) > 1:
        sys.exit(f"rows of several commits ({', '.join(commits)}): give one run's files")
    return rows

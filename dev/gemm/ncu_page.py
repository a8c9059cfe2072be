"""Reads an ncu source page (`ncu -i REP --page source --print-source sass --csv`, plain or .gz):
the first kernel's SASS rows (the page repeats for the next kernel), for ncu_stalls.py and
ncu_split_warps.py."""
import csv
import gzip


class SourcePage:
    def __init__(self, path):
        opener = gzip.open if path.endswith(".gz") else open
        rows = list(csv.reader(opener(path, "rt")))
        self.title = rows[0][1] if len(rows[0]) > 1 else ""
        hdr = rows[1]
        self.col = {h: i for i, h in enumerate(hdr)}
        self.stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
        seen, self.instrs = set(), []
        for r in rows[2:]:
            if not r or not r[0].startswith("0x"):
                continue
            if r[0] in seen:  # the next kernel's copy of the page
                break
            seen.add(r[0])
            self.instrs.append(r)
        self.base = int(self.instrs[0][0], 16)

    def samples(self, r, name="Warp Stall Sampling (All Samples)"):
        return int(r[self.col[name]] or 0)

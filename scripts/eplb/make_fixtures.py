#!/usr/bin/env python3
"""Run the public EPLB reference (github.com/deepseek-ai/EPLB, eplb.py) on fixed inputs and write
JSON fixtures that tests/eplb/ compares fp8moe's EPLB against, with the reference's timings.

Usage: python3 scripts/eplb/make_fixtures.py PATH/TO/eplb.py OUT_DIR
The reference is imported from the given path (it is never copied into this repository). It
needs PyTorch (run it where torch is installed, e.g. the GPU device machine).

Writes OUT_DIR/eplb_small.json (the README example and seeded random cases, full outputs),
OUT_DIR/eplb_v3.json (DeepSeek-V3 scale: inputs, phy2log and logcnt only), OUT_DIR/timing.json
and OUT_DIR/sort_probe.json (the order torch.sort gives equal keys, which decides replica order).
"""
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch


def load_reference(path):
    spec = importlib.util.spec_from_file_location("eplb_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def f32_list(t):
    # float32 values printed with 9 significant digits round-trip exactly.
    return [[float("%.9g" % v) for v in row] for row in t.tolist()]


def run_case(eplb, name, weight, R, G, N, P, full=True, repeats=1):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        phy2log, log2phy, logcnt = eplb.rebalance_experts(weight, R, G, N, P)
        times.append(time.perf_counter() - t0)
    case = {
        "name": name,
        "input": {"weight": f32_list(weight.float()) if weight.is_floating_point() else weight.tolist(),
                  "num_replicas": R, "num_groups": G, "num_nodes": N, "num_gpus": P},
        "policy": "hierarchical" if G % N == 0 else "global",
        "phy2log": phy2log.tolist(),
        "logcnt": logcnt.tolist(),
        "ms_median": statistics.median(times) * 1e3,
        "repeats": repeats,
    }
    if full:
        case["log2phy"] = log2phy.tolist()
    return case


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    eplb = load_reference(sys.argv[1])
    out_dir = sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)

    small = []
    readme = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    small.append(run_case(eplb, "readme", readme, 16, 4, 2, 8, repeats=5))

    # (layers, experts, replicas, groups, nodes, gpus, integer loads?)
    shapes = [
        (3, 16, 24, 4, 2, 4, False), (4, 32, 48, 8, 4, 8, False), (2, 64, 96, 8, 2, 16, False),
        (5, 24, 36, 6, 3, 6, False), (3, 16, 16, 4, 4, 4, False), (3, 64, 72, 8, 4, 8, False),
        (4, 16, 20, 3, 2, 4, False), (3, 64, 80, 4, 3, 8, False), (2, 48, 64, 5, 2, 16, False),
        (3, 32, 64, 1, 1, 8, False), (2, 256, 320, 8, 40, 320, False),
        (4, 16, 24, 4, 2, 4, True), (4, 32, 48, 8, 4, 8, True),
    ]
    for seed, (L, E, R, G, N, P, integer) in enumerate(shapes):
        gen = torch.Generator().manual_seed(1000 + seed)
        if integer:
            w = torch.randint(0, 200, (L, E), generator=gen)
        else:
            # Skewed loads: exp of a normal, scaled to token counts.
            w = (torch.randn(L, E, generator=gen) * 1.2).exp() * 100.0
        small.append(run_case(eplb, f"random_{seed}", w, R, G, N, P))
    with open(os.path.join(out_dir, "eplb_small.json"), "w") as f:
        json.dump({"reference": "github.com/deepseek-ai/EPLB eplb.py", "cases": small}, f)

    big = []
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(58, 256, generator=gen) * 1.2).exp() * 100.0
    big.append(run_case(eplb, "v3_288_4n_32g", w, 288, 8, 4, 32, full=False, repeats=5))
    big.append(run_case(eplb, "v3_320_8n_64g", w, 320, 8, 8, 64, full=False, repeats=5))
    big.append(run_case(eplb, "v3_global_320_320g", w, 320, 8, 40, 320, full=False, repeats=5))
    # The three cases share one load matrix: store it once.
    v3_weight = big[0]["input"]["weight"]
    for c in big:
        assert c["input"].pop("weight") == v3_weight
    with open(os.path.join(out_dir, "eplb_v3.json"), "w") as f:
        json.dump({"reference": "github.com/deepseek-ai/EPLB eplb.py", "weight": v3_weight,
                   "cases": big}, f, separators=(",", ":"))

    # How torch.sort (descending, not stable) orders equal keys, for sizes below and above the
    # 16 elements where introsort switches from insertion sort.
    probes = []
    gen = torch.Generator().manual_seed(99)
    for n in (8, 12, 16, 17, 20, 40, 72, 100, 300):
        keys = torch.randint(0, 6, (n,), generator=gen).float()
        probes.append({"keys": keys.tolist(),
                       "order": keys.sort(-1, descending=True).indices.tolist()})
    row = torch.tensor([[3.0, 5.0, 1.0, 5.0, 5.0, 2.0]])
    with open(os.path.join(out_dir, "sort_probe.json"), "w") as f:
        json.dump({"torch": torch.__version__, "sort_desc": probes,
                   "max_first_index": int(row.max(dim=-1).indices[0])}, f)

    timing = {"torch": torch.__version__, "python": platform.python_version(),
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "cases": [{"name": c["name"], "ms_median": c["ms_median"], "repeats": c["repeats"]}
                        for c in small[:1] + big]}
    try:
        with open("/proc/cpuinfo") as f:
            timing["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open(os.path.join(out_dir, "timing.json"), "w") as f:
        json.dump(timing, f, indent=1)
    for c in small[:1] + big:
        print(f"{c['name']}: {c['ms_median']:.2f} ms")


if __name__ == "__main__":
    main()

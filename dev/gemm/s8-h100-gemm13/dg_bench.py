#!/usr/bin/env python3
"""DeepGEMM's dense 1D2D FP8 GEMM (fp8_gemm_nt, BF16 out) timed four ways at the M = 4096 V3
shapes, for dev/gemm/NOTES.md "Session 8 — DeepGEMM beside ours (gemm13)":
  kineto_flush8g  its own bench_kineto (CUPTI kernel time, an 8 GB memset before every call):
                  how ANCHORS.md's DeepGEMM figures were taken;
  kineto_noflush  bench_kineto without the memset (Python launch gaps between calls);
  b2b             ours: back-to-back launches (a CUDA graph of many calls where capture works),
                  inputs rotated over sets that exceed 3x the L2, CUDA events, median of 7;
  flush8g_events  gemm_bench's FP8MOE_BENCH_FLUSH_L2 way: events around single launches, each
                  after an 8 GB memset, median of 21.
Each phase prints its unix start/end so the NVML sampler's rows can be attributed to it.
`--jit M N K` only compiles (one call) so that several shapes can be compiled in parallel;
`--ncu M N K` launches one shape four times (for an ncu profile of one launch);
`--sustained M N K SECONDS ROWS` replays a graph of 32 launches without pause for SECONDS, then
times 7 replays (the GPU at its power cap, like gemm_bench's plain sweep)."""
import json
import math
import sys
import time

import torch
import deep_gemm
from deep_gemm.testing import bench_kineto, calc_diff
from deep_gemm.utils import per_token_cast_to_fp8, per_block_cast_to_fp8, get_mn_major_tma_aligned_tensor

SHAPES = [(4096, 4096, 7168), (4096, 2112, 7168), (4096, 24576, 1536), (4096, 32768, 512),
          (4096, 7168, 16384), (4096, 7168, 2048)]
L2 = 50 * 1024 * 1024


def make(m, n, k, seed):
    torch.manual_seed(seed)
    a = torch.randn((m, k), device='cuda', dtype=torch.bfloat16)
    b = torch.randn((n, k), device='cuda', dtype=torch.bfloat16)
    return a, b, per_token_cast_to_fp8(a, use_ue8m0=False), per_block_cast_to_fp8(b, use_ue8m0=False)


def phase(rows, name, shape, fn):
    t0 = time.time()
    try:
        v = fn()
    except Exception as ex:  # one failing way must not cost the others
        print(f'{name} {shape} failed: {ex!r}'[:400], flush=True)
        return
    t1 = time.time()
    rows.append({'phase': name, 'm': shape[0], 'n': shape[1], 'k': shape[2], 't0': t0, 't1': t1,
                 'us': v * 1e6, 'tflops': 2 * shape[0] * shape[1] * shape[2] / v / 1e12})
    print(json.dumps(rows[-1]), flush=True)


def b2b(launch, sets):
    torch.cuda.synchronize()
    t = time.time()
    i = 0
    while time.time() - t < 0.03 or i < sets:
        launch(i % sets)
        i += 1
        if i % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for j in range(3):
        launch(j % sets)
    e1.record()
    e1.synchronize()
    first_us = e0.elapsed_time(e1) * 1000 / 3
    reps = int(min(max(3000 / max(first_us, 1), 4), 400))
    replay = None
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                for j in range(reps):
                    launch(j % sets)
        replay = g.replay
        mode = 'graph'
    except Exception as ex:  # eager back-to-back launches instead
        print(f'graph capture failed ({ex}); eager loop', flush=True)
        torch.cuda.synchronize()

        def replay():
            for j in range(reps):
                launch(j % sets)
        mode = 'eager'
    replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(7):
        e0.record()
        replay()
        e1.record()
        e1.synchronize()
        samples.append(e0.elapsed_time(e1) * 1000 / reps)
    samples.sort()
    print(f'  b2b {mode} reps={reps} samples_us={[round(x, 1) for x in samples]}', flush=True)
    return samples[3] * 1e-6


def flushed_events(launch, sets, scratch):
    # gemm_bench's time_us_flushed with an 8 GB memset.
    b2b_warm = time.time()
    i = 0
    while time.time() - b2b_warm < 0.03 or i < sets:
        launch(i % sets)
        i += 1
        if i % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for j in range(21):
        scratch.fill_(j & 0xFF)
        e0.record()
        launch(j % sets)
        e1.record()
        e1.synchronize()
        samples.append(e0.elapsed_time(e1) * 1000)
    samples.sort()
    return samples[10] * 1e-6


def kernel_names(fn):
    try:
        return kernel_names_of(fn)
    except Exception as ex:
        return [f'profiler failed: {ex!r}'[:200]]


def kernel_names_of(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    names = set()
    for e in prof.key_averages():
        if getattr(e, 'device_time_total', getattr(e, 'cuda_time_total', 0)) > 0:
            names.add(f'{e.key[:90]} x{e.count}')
    return sorted(names)


def main():
    if sys.argv[1:2] == ['--jit']:
        m, n, k = map(int, sys.argv[2:5])
        a, b, af, bf = make(m, n, k, 0)
        d = torch.empty((m, n), device='cuda', dtype=torch.bfloat16)
        deep_gemm.fp8_gemm_nt(af, bf, d)
        torch.cuda.synchronize()
        return
    if sys.argv[1:2] == ['--ncu']:
        # One shape, scales pre-transposed, four launches (ncu profiles one of them).
        m, n, k = map(int, sys.argv[2:5])
        a, b, (af, sf), bf = make(m, n, k, 0)
        d = torch.empty((m, n), device='cuda', dtype=torch.bfloat16)
        pa = (af, get_mn_major_tma_aligned_tensor(sf))
        for _ in range(4):
            deep_gemm.fp8_gemm_nt(pa, bf, d)
        torch.cuda.synchronize()
        return
    if sys.argv[1:2] == ['--sustained']:
        # Graph replays for argv[5] seconds without a pause (the GPU reaches its power cap, as in
        # gemm_bench's plain sweep), then 7 timed replays: the sustained back-to-back figure.
        m, n, k = map(int, sys.argv[2:5])
        secs = float(sys.argv[5])
        sets = max(1, min(8, math.ceil(3 * L2 / (m * k + n * k))))
        data = [make(m, n, k, s) for s in range(sets)]
        d = torch.empty((m, n), device='cuda', dtype=torch.bfloat16)
        pre = [((af, get_mn_major_tma_aligned_tensor(sf)), (bfp, sfb)) for (_, _, (af, sf), (bfp, sfb)) in data]
        launch = lambda i: deep_gemm.fp8_gemm_nt(pre[i][0], pre[i][1], d)
        launch(0)
        torch.cuda.synchronize()
        reps = 32
        g = torch.cuda.CUDAGraph()
        st = torch.cuda.Stream()
        with torch.cuda.stream(st):
            with torch.cuda.graph(g, stream=st):
                for j in range(reps):
                    launch(j % sets)
        rows = []

        def run():
            t = time.time()
            while time.time() - t < secs:
                for _ in range(8):
                    g.replay()
                torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            samples = []
            for _ in range(7):
                e0.record()
                g.replay()
                e1.record()
                e1.synchronize()
                samples.append(e0.elapsed_time(e1) * 1000 / reps)
            samples.sort()
            return samples[3] * 1e-6
        phase(rows, f'dg_sustained_{secs:g}s', (m, n, k), run)
        with open(sys.argv[6], 'a') as f:
            for r in rows:
                f.write(json.dumps(r) + '\n')
        return
    only = sys.argv[1] if len(sys.argv) > 1 else ''
    rows = []
    scratch = torch.empty(int(8e9), dtype=torch.uint8, device='cuda')
    for shape in SHAPES:
        m, n, k = shape
        if only and only != f'{m}x{n}x{k}':
            continue
        set_bytes = m * k + n * k
        sets = max(1, min(8, math.ceil(3 * L2 / set_bytes)))
        data = [make(m, n, k, s) for s in range(sets)]
        d = torch.empty((m, n), device='cuda', dtype=torch.bfloat16)
        a0, b0, af0, bf0 = data[0]
        # The test's call (raw per-token scales; DeepGEMM transposes them in a kernel of its own)
        fn = lambda: deep_gemm.fp8_gemm_nt(af0, bf0, d)
        fn()
        ref = (a0.float() @ b0.float().t()).to(torch.bfloat16)
        diff = float(calc_diff(d, ref))
        del ref
        print(json.dumps({'shape': shape, 'sets': sets, 'calc_diff': diff, 'kernels_raw_sf': kernel_names(fn)}), flush=True)
        # Scales pre-transposed into the layout the kernel reads: one kernel per call.
        pre = [((af, get_mn_major_tma_aligned_tensor(sf)), (bfp, sfb)) for (_, _, (af, sf), (bfp, sfb)) in data]
        launch = lambda i: deep_gemm.fp8_gemm_nt(pre[i][0], pre[i][1], d)
        print(json.dumps({'shape': shape, 'kernels_pre_sf': kernel_names(lambda: launch(0))}), flush=True)
        phase(rows, 'kineto_flush8g', shape, lambda: bench_kineto(fn, 'gemm_', suppress_kineto_output=True))
        phase(rows, 'b2b', shape, lambda: b2b(launch, sets))
        phase(rows, 'flush8g_events', shape, lambda: flushed_events(launch, sets, scratch))
        phase(rows, 'kineto_noflush', shape, lambda: bench_kineto(fn, 'gemm_', suppress_kineto_output=True, flush_l2=False))
        phase(rows, 'kineto_flush8g_again', shape, lambda: bench_kineto(fn, 'gemm_', suppress_kineto_output=True))
        del data, pre, d
        torch.cuda.empty_cache()
    with open(sys.argv[2] if len(sys.argv) > 2 else '/tmp/dg_rows.jsonl', 'w') as f:
        for r in rows:
            f.write(json.dumps(r) + '\n')


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
# gemm9 (session 6b): a toy model, not a measurement. `python3 pipeline_model.py` prints the
# modelled launch time (us) of M = 128 N = 32768 K = 512 for 4-8 stages at three DRAM latencies.
# Toy model of M=128 N=32768 K=512 on 132 SMs: DRAM serves 16 KB B blocks FIFO at `bw`, each
# arriving `lat` after its service ends; an SM consumes its blocks in order, `c` us each, and
# frees a stage slot when a block's compute ends; a freed slot immediately requests the SM's
# next block. The last tile's epilogue `epi` us is not overlapped. A reads (L2) are ignored.
import heapq, sys
def sim(stages, bw=3.0e12, lat=0.8, c=0.30, epi=0.8, sms=132, tiles=256, kb=4, blk=16384):
    per_sm = [[] for _ in range(sms)]
    for t in range(tiles): per_sm[t % sms].append(t)
    nblk = [len(v) * kb for v in per_sm]
    svc = blk / bw * 1e6  # us per block at the DRAM
    dram_free = 0.0
    arrive = [dict() for _ in range(sms)]
    queue = []  # (request time, sm, block) served FIFO by request time
    issued = [0] * sms
    for s in range(sms):
        for j in range(min(stages, nblk[s])):
            queue.append((0.0, j, s)); issued[s] += 1
    # process: each SM's consumption depends on arrivals; iterate events in time order
    done = [0] * sms; t_sm = [0.0] * sms; finish = [0.0] * sms
    heapq.heapify(queue)
    pending = []
    while queue:
        rt, j, s = heapq.heappop(queue)
        start = max(dram_free, rt); dram_free = start + svc
        arrive[s][j] = dram_free + lat
        # consume every block of s whose arrival is known, in order
        while done[s] < nblk[s] and done[s] in arrive[s]:
            b = done[s]
            t_sm[s] = max(t_sm[s], arrive[s][b]) + c
            done[s] += 1
            if issued[s] < nblk[s]:
                heapq.heappush(queue, (t_sm[s], issued[s], s)); issued[s] += 1
        if done[s] == nblk[s]: finish[s] = t_sm[s] + epi
    return max(finish)
for lat in (0.6, 0.8, 1.2):
    print("lat", lat, " ".join("S=%d: %.2f" % (s, sim(s, lat=lat)) for s in (4, 5, 6, 7, 8)))

# One line per row: dense small M (pick, no-split pick, 128x128, 128x192, 128x256, cuBLASLt) and
# every grouped row (pick, forced 128x256, forced 128x128).
import json, sys
for path in sys.argv[1:]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for l in lines:
        j = json.loads(l)
        t = j.get('tile', '')
        if j['kind'] == 'dense':
            if j['impl'] in ('cublaslt_fp8_tensor', 'cublaslt_bf16'): continue
            if j['impl'] == 'fp8moe_forced_tile' and (
                    'split' in t or 'tail' in t or t.startswith('64x')): continue
        t = t.replace('x128/s', '/s').replace('/sm132', '').replace('/sm0', '')
        print(f"{j['kind'][:8]:8s} g{j['groups']:<2d} {j['m']:5d} {j['n']:5d} {j['k']:5d} {j['impl'][:18]:18s} {t[:26]:26s} {j['us']:8.1f} {j['tflops']:6.0f} x{j.get('ratio_vs_cublaslt_blockwise', 0):.2f} {j.get('sm_mhz', 0):5.0f} {j.get('note', '')} {j.get('rel_diff_vs_pick', '')}")

#!/usr/bin/env python3
"""Record the per-rank compute order of the public DualPipe / DualPipeV reference as test fixtures.

How it works
------------
The reference (github.com/deepseek-ai/DualPipe, package `dualpipe/`) decides its schedule inside
the `step()` methods of `DualPipe` and `DualPipeV`, which drive torch.distributed. There is no
torch and no GPU here, so this script:

1. imports the reference package unmodified from a source tree given on the command line (a
   directory holding `dualpipe/`, or a bare git mirror, whose HEAD is then extracted with
   `git archive` into a temporary directory), after putting small stand-in modules for `torch`,
   `torch.nn`, `torch.distributed` and `torch.autograd` into `sys.modules`. The stand-ins hold no
   logic of the schedule: an `nn.Module` base class, a process group that answers `rank()` and
   `size()`, no-op tensors.
2. constructs the reference class for each rank through its real `__init__` (with a stand-in
   process group of P ranks), so the rank bookkeeping (`is_in_second_half`, `is_middle_rank`, ...)
   is the reference's own.
3. replaces, on that instance, the compute methods (`_forward_compute_chunk`,
   `_backward_compute_chunk`, `_forward_backward_compute_chunk`) with recorders that append our
   operation names, and the communication methods (`_recv_*`, `_send_*`,
   `_commit_and_wait_comm`) with no-ops. `_weight_chunk` is left as the reference wrote it: a
   backward with zero-bubble splitting records `I<c>.<m>` and queues a callable in the reference's
   own `WeightGradStore`; the reference pops it FIFO in `_weight_chunk`, which records
   `W<c>.<m>`. A forward-backward pair records `F<c>.<m>|B<c'>.<m'>`.
4. runs the real `step()` once per rank and writes
   `{"method","ranks","micro_batches","ranks_ops","reference"}` (fp8moe's schedule JSON, see
   "fp8moe pipeline schedule" in shared/DESIGN.md, plus the reference commit) to
   `<out>/<method>-P<P>-M<M>.json`.

Naming: chunk c is the direction of the model copy the operation belongs to (the reference's
`phase ^ is_in_second_half` for DualPipe, `phase` for DualPipeV); micro-batch m is the reference's
per-phase chunk counter (`current_f_chunk_id` / `current_b_chunk_id`) at the time of the call.

Run against commit 3da1bbea53606543d7f5f232338fc58096db30e3 of deepseek-ai/DualPipe:
    python3 scripts/pipeline/dump_reference_orders.py \
        --reference /work/.mirror/deepseek-ai+DualPipe/repo --out tests/pipeline/fixtures \
        --settings dualpipe:2:4,dualpipe:4:8,dualpipe:4:10,dualpipe:6:12,dualpipe:8:16,\
dualpipe:8:20,dualpipe:16:32,dualpipev:2:4,dualpipev:3:6,dualpipev:4:9,dualpipev:4:10,\
dualpipev:8:16,dualpipev:8:20,dualpipev:16:33
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import types


# ---- stand-ins for torch -------------------------------------------------------------------

def _install_torch_stand_ins():
    torch = types.ModuleType("torch")
    nn = types.ModuleType("torch.nn")
    dist = types.ModuleType("torch.distributed")
    c10d = types.ModuleType("torch.distributed.distributed_c10d")
    autograd = types.ModuleType("torch.autograd")

    class Tensor:  # only ever a type annotation or a placeholder here
        pass

    class Module:
        def __init__(self, *args, **kwargs):
            pass

    class ModuleList(list, Module):
        pass

    class ProcessGroup:
        def __init__(self, rank, size):
            self._rank, self._size = rank, size

        def rank(self):
            return self._rank

        def size(self):
            return self._size

    torch.Tensor = Tensor
    torch.dtype = type("dtype", (), {})
    torch.float32 = "float32"
    torch.device = lambda index: ("device", index)
    torch.cuda = types.SimpleNamespace(current_device=lambda: 0)
    torch.is_grad_enabled = lambda: True
    torch.empty = lambda *a, **k: Tensor()
    torch.stack = lambda xs: list(xs)
    torch.cat = lambda xs, dim=0: list(xs)
    nn.Module = Module
    nn.ModuleList = ModuleList
    dist.ProcessGroup = ProcessGroup
    dist.P2POp = lambda *a, **k: None
    dist.isend = dist.irecv = None
    dist.batch_isend_irecv = lambda ops: []
    dist.get_rank = lambda: 0
    c10d._get_default_group = lambda: None
    c10d.get_global_rank = lambda group, rank: rank
    dist.distributed_c10d = c10d
    autograd.Variable = type("Variable", (), {})
    torch.nn, torch.distributed, torch.autograd = nn, dist, autograd
    sys.modules.update({"torch": torch, "torch.nn": nn, "torch.distributed": dist,
                        "torch.distributed.distributed_c10d": c10d, "torch.autograd": autograd})
    return ProcessGroup


class _StandInStage:
    """What the reference's __init__ inspects on a stage module: parameters() and its device."""

    def parameters(self):
        yield types.SimpleNamespace(device=("device", 0))


# ---- recording -----------------------------------------------------------------------------

def _record_rank(cls, group, chunk_of_phase, num_chunks, weight_store):
    pipe = cls((_StandInStage(), _StandInStage()), process_group=group)
    ops = []
    counters = {"F": [0, 0], "B": [0, 0]}

    def next_op(kind, phase):
        c = chunk_of_phase(pipe, phase)
        m = counters[kind][c]
        counters[kind][c] += 1
        return c, m

    def forward_compute(phase):
        c, m = next_op("F", phase)
        ops.append(f"F{c}.{m}")

    def backward_compute(phase, enable_zb=False):
        c, m = next_op("B", phase)
        if enable_zb:
            ops.append(f"I{c}.{m}")
            weight_store.put(lambda c=c, m=m: ops.append(f"W{c}.{m}"))
            weight_store.flush()
        else:
            ops.append(f"B{c}.{m}")

    def forward_backward_compute(phase0, phase1):
        c0, m0 = next_op("F", phase0)
        c1, m1 = next_op("B", phase1)
        ops.append(f"F{c0}.{m0}|B{c1}.{m1}")

    noop = lambda *a, **k: None
    pipe._forward_compute_chunk = forward_compute
    pipe._backward_compute_chunk = backward_compute
    pipe._forward_backward_compute_chunk = forward_backward_compute
    for name in ("_recv_forward", "_send_forward", "_recv_backward", "_send_backward",
                 "_commit_and_wait_comm"):
        setattr(pipe, name, noop)
    pipe.step(num_chunks=num_chunks, criterion=noop)
    return ops


def _source_tree(path):
    if os.path.isdir(os.path.join(path, "dualpipe")):
        return path, None
    # A bare git mirror: extract HEAD.
    commit = subprocess.check_output(["git", "--git-dir", path, "rev-parse", "HEAD"], text=True).strip()
    tmp = tempfile.mkdtemp(prefix="dualpipe-ref-")
    archive = subprocess.Popen(["git", "--git-dir", path, "archive", "HEAD"], stdout=subprocess.PIPE)
    subprocess.check_call(["tar", "-x", "-C", tmp], stdin=archive.stdout)
    if archive.wait() != 0:
        sys.exit(f"git archive failed for {path}")
    return tmp, commit


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True,
                        help="DualPipe source tree (holding dualpipe/) or its bare git mirror")
    parser.add_argument("--out", required=True, help="output folder for the fixtures")
    parser.add_argument("--settings", required=True,
                        help="comma-separated method:P:M, method in {dualpipe, dualpipev}")
    args = parser.parse_args()

    tree, commit = _source_tree(args.reference)
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "-C", tree, "rev-parse", "HEAD"], text=True,
                                             stderr=subprocess.DEVNULL).strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            commit = "unknown"
    process_group = _install_torch_stand_ins()
    sys.path.insert(0, tree)
    dualpipe = importlib.import_module("dualpipe")
    utils = importlib.import_module("dualpipe.utils")
    comm = importlib.import_module("dualpipe.comm")
    comm.set_p2p_tensor_shapes([(1,)])
    comm.set_p2p_tensor_dtype("float32")

    methods = {
        "dualpipe": (dualpipe.DualPipe, lambda pipe, phase: phase ^ int(pipe.is_in_second_half)),
        "dualpipev": (dualpipe.DualPipeV, lambda pipe, phase: phase),
    }
    os.makedirs(args.out, exist_ok=True)
    for setting in args.settings.split(","):
        method, p, m = setting.split(":")
        p, m = int(p), int(m)
        cls, chunk_of_phase = methods[method]
        ranks_ops = [_record_rank(cls, process_group(r, p), chunk_of_phase, m, utils.WeightGradStore)
                     for r in range(p)]
        doc = {"method": method, "ranks": p, "micro_batches": m, "ranks_ops": ranks_ops,
               "reference": f"deepseek-ai/DualPipe@{commit}"}
        path = os.path.join(args.out, f"{method}-P{p}-M{m}.json")
        with open(path, "w") as f:
            f.write(json.dumps(doc, separators=(",", ":")) + "\n")
        print(f"{path}: {sum(len(r) for r in ranks_ops)} steps")


if __name__ == "__main__":
    main()

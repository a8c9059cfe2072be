# shellcheck shell=bash disable=SC2034  # sourced: the caller uses d, O, R
# Sourced (not run) by a device call script after it sets `bin` (the folder of the binaries,
# relative to the repository root), `archive` (their bins.tar.xz, unpacked into bin unless bin
# already holds them) and `name` (the name of the archive that comes back). It
# writes what every call script repeated until session 11: NCCL_NVLS_ENABLE=0 (never NVLink
# multicast), the NCCL library of the Python package nvidia.nccl on LD_LIBRARY_PATH, the binaries
# unpacked, $R a fresh result folder with machine.txt, $O the folder that comes back, $d today's
# date, `el` for elapsed-time stamps and `pack` to write $O/$name.tgz (call it after each step,
# so a call cut short still returns what it finished).
: "${bin:?set bin: the folder of the binaries}" "${archive:?set archive: their bins.tar.xz}"
: "${name:?set name: the name of the archive that comes back}"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
if [[ -z $(ls -A "$bin" 2>/dev/null) ]]; then
  mkdir -p "$bin" && tar xJf "$archive" -C "$bin"
fi
O=${OUT:-/tmp/$name}
R=$(mktemp -d)
mkdir -p "$O"
d=$(date -u +%F)
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*"; }
pack() { tar czf "$O/$name.tgz" -C "$R" .; }
{ date -u; nvidia-smi -L; } > "$R/machine.txt" 2>&1

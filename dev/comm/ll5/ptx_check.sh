#!/usr/bin/env bash
# ll5's PTX check (session 17 late): every kernel and device function of sm90_device_ep_ll.cu on
# main (12dc4f3, V the default) has the identical body after ll5's diff, V's instances included.
# k_dispatch_send_rp, k_dispatch_recv_rp and k_combine_send gained a trailing defaulted parameter
# (bool kIds / kWords / kSplit = false): "k_dispatch_send_rp<N, false>(", "k_dispatch_recv_rp<B,
# false>(" and "k_combine_send<N, B, false>(" are renamed back to "<N>(" / "<B>(" / "<N, B>(". The
# new kernels (k_dispatch_send_rp<*, true>, k_dispatch_recv_rp<*, true>, k_combine_send<*, true,
# true>) and the device function wait_word are the only functions allowed to differ (ONLY AFTER).
# Usage: ptx_check.sh BEFORE.ptx AFTER.ptx (made with the build's own nvcc command, -ptx; see the
# tool's docstring).
set -uo pipefail
before=$1 after=$2
root=$(cd "$(dirname "$0")/../../.." && pwd)
renames=()
while IFS= read -r name; do
  [[ -z $name ]] && continue
  renames+=(--rename "${name}=$(sed -E 's/, false>\($/>(/' <<<"$name")")
done < <(grep -oE '_Z[A-Za-z0-9_$]+' "$after" | sort -u | c++filt |
           grep -oE 'k_dispatch_(send|recv)_rp<[^()]*, false>\(|k_combine_send<[^(),]*, [a-z]+, false>\(' |
           sort -u)
out=$(python3 "$root/tools/ptx_same_functions.py" --before "$before" --after "$after" "${renames[@]}")
echo "$out" | tail -1
bad=$(echo "$out" | grep -vE '^identical|functions compared' |
        grep -vE '^ONLY AFTER +(entry \{void fp8moe::comm::ll::(k_dispatch_send_rp<[0-3], true>|k_dispatch_recv_rp<(true|false), true>|k_combine_send<[0-3], true, true>)\(|func .*wait_word)')
if [[ -n $bad ]]; then
  echo "$bad"
  exit 1
fi
echo "every function of before identical after; new: $(echo "$out" | grep -c '^ONLY AFTER') functions"

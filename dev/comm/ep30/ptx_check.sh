#!/usr/bin/env bash
# ep30's PTX check: every kernel and device function of the normal kernel files before the change
# has the identical body after it (tools/ptx_same_functions.py). The templates that gained a
# trailing defaulted parameter (k_dispatch_recv, send_payload_claims, k_combine_send_bulk,
# k_combine_recv: bool kDefer / kGive = false; k_bwd_send: template <bool kGive = false>) are
# renamed back: "NAME<..., false>(" -> "NAME<...>(", k_bwd_send<false>( -> k_bwd_send(; the
# inline-asm WAIT_<n> labels are normalised (below).
# Usage: ptx_check.sh DIR (holding NAME.before.ptx and NAME.after.ptx for each file).
set -euo pipefail
dir=$1
root=$(cd "$(dirname "$0")/../../.." && pwd)
status=0
for f in sm90_device_ep_dispatch sm90_device_ep_combine sm90_device_ep_backward; do
  renames=()
  while IFS= read -r name; do
    [[ -z $name ]] && continue
    renames+=(--rename "${name}=$(sed -E 's/, false>\($/>(/' <<<"$name")")
  done < <(grep -oE '^\.(visible )?\.?(entry|func)[^(]*|\.(entry|func) [^ (]*' "$dir/$f.after.ptx" |
             grep -oE '_Z[A-Za-z0-9_$]+' | c++filt |
             grep -oE '(k_dispatch_recv|send_payload_claims|k_combine_send_bulk|k_combine_recv)<[^()]*, false>\(' |
             sort -u)
  # send_payload_claims is inlined: its name is only in its shared variables' names.
  [[ $f == sm90_device_ep_dispatch ]] &&
    renames+=(--rename 'send_payload_claims<true, false>(=send_payload_claims<true>('
              --rename 'send_payload_claims<false, false>(=send_payload_claims<false>(')
  [[ $f == sm90_device_ep_backward ]] &&
    renames+=(--rename 'void fp8moe::comm::bwd::k_bwd_send<false>(=fp8moe::comm::bwd::k_bwd_send('
              --rename 'k_bwd_send<false>(=k_bwd_send(')
  # The mbarrier waits' inline-asm labels (WAIT_<n>, numbered by %= across the module, so a new
  # instance emitted earlier renumbers the later ones) are local to their braces: one name.
  sed -E 's/WAIT_[0-9]+/WAIT_N/g' "$dir/$f.before.ptx" >"$dir/$f.before.norm.ptx"
  sed -E 's/WAIT_[0-9]+/WAIT_N/g' "$dir/$f.after.ptx" >"$dir/$f.after.norm.ptx"
  echo "== $f (${#renames[@]} rename args)"
  python3 "$root/tools/ptx_same_functions.py" --before "$dir/$f.before.norm.ptx" \
    --after "$dir/$f.after.norm.ptx" \
    "${renames[@]}" || status=1
done
exit $status

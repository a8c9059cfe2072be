#!/usr/bin/env bash
# Builds the training corpus and its tokenizer (data/kjv.txt, data/kjv_sp2048.model/.vocab).
# Source: the King James Version of the Bible as packaged by Debian (bible-kjv-text, public
# domain text; see data/README.md). Needs the Debian packages bible-kjv and sentencepiece.
# The outputs are committed; run this only to regenerate them.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
out="$here/data"
command -v bible >/dev/null || { echo "needs the Debian package bible-kjv (apt-get install bible-kjv)" >&2; exit 1; }
command -v spm_train >/dev/null || { echo "needs the Debian package sentencepiece" >&2; exit 1; }
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
# One verse per line, verse numbers and chapter headings dropped.
bible -l1000 gen1:1-rev22:21 </dev/null >"$tmp"
sed -n 's/^ *[0-9][0-9]* \(.*\)$/\1/p' "$tmp" >"$out/kjv.txt"
# A 2048-piece BPE vocabulary; the model config's vocab_size must match it (configs/tiny.json).
spm_train --input="$out/kjv.txt" --model_prefix="$out/kjv_sp2048" --vocab_size=2048 \
  --model_type=bpe --character_coverage=1.0 --pad_id=-1 --unk_id=0 --bos_id=1 --eos_id=2 \
  --input_sentence_size=1000000 --shuffle_input_sentence=false --num_threads=2 \
  --minloglevel=1
wc -c "$out/kjv.txt"

#!/usr/bin/env bash
# Here (no GPU needed, nvcc needed): build every GPU test and GPU benchmark once, with libstdc++
# and libgcc linked statically so that the binaries run on a lent GPU machine whose system
# libraries differ, and copy them to build-bundle/bin (git-ignored; carry it to the device, a few
# MB). Then on the device: `bash scripts/gpu_validate.sh` runs them all. This saves the device the
# CMake configure and the CUDA compile (minutes of device time per call).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-bundle -G Ninja -DCMAKE_BUILD_TYPE=Release -DFP8MOE_BUILD_BENCH=ON \
  -DCMAKE_EXE_LINKER_FLAGS="-static-libstdc++ -static-libgcc" > /dev/null
# Only what runs on the device: the GPU tests and the GPU benchmarks (bench/gpu/*.cu). The CPU
# benchmarks stay here: with them the folder, carried beside the tree, passed the device tool's
# 64 MiB limit in session 7.
targets=()
for t in $(cmake --build build-bundle --target help | sed -n 's/^\(test_[a-z]*_gpu\):.*/\1/p'); do
  targets+=("$t")
done
for f in bench/gpu/*.cu; do
  targets+=("$(basename "$f" .cu)")
done
cmake --build build-bundle -j "${JOBS:-2}" --target "${targets[@]}"
rm -rf build-bundle/bin && mkdir -p build-bundle/bin
for t in "${targets[@]}"; do
  f=$(find build-bundle -name "$t" -type f -perm -u+x | head -1)
  [[ -n "$f" ]] && cp "$f" build-bundle/bin/
done
ls -la build-bundle/bin
# The device tool carries at most 64 MiB together with the tree (23 MiB in session 8): also a
# stripped, xz-packed copy of the folder (~5 MB instead of ~45), build-bundle/bins.tar.xz, which
# scripts/device_full_validation.sh unpacks into build-bundle/bin when that folder is missing.
rm -rf build-bundle/pack && mkdir -p build-bundle/pack
cp build-bundle/bin/* build-bundle/pack/
strip build-bundle/pack/*
tar cJf build-bundle/bins.tar.xz -C build-bundle/pack .
rm -rf build-bundle/pack
ls -la build-bundle/bins.tar.xz
# The Debian shared libraries the binaries link that a lent machine may lack (SentencePiece, read
# by the trainer's tests; fmt, which the CLI links; the C++ runtime they were built against): carry
# build-bundle/lib too.
rm -rf build-bundle/lib && mkdir -p build-bundle/lib
for lib in libsentencepiece.so.0 libfmt.so.9 libstdc++.so.6 libgcc_s.so.1; do
  f=$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ {print $NF; exit}')
  [[ -n $f ]] && cp -L "$f" build-bundle/lib/
done
ls -la build-bundle/lib

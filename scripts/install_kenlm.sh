#!/usr/bin/env bash
# KenLM's estimator (`lmplz`) and binary converter (`build_binary`), built into BIN_DIR from the source archive of the
# `kenlm` package on PyPI. Its Python module only queries models, no wheel ships the tools, and no Debian package
# has them; the archive holds their code (`lm/builder`), built with CMake against Boost.
#
#   bash scripts/install_kenlm.sh .venv/bin
set -euo pipefail
BIN=${1:?usage: install_kenlm.sh BIN_DIR [PYTHON]}
PYTHON=${2:-$BIN/python}
VERSION=0.3.0

if [ -x "$BIN/lmplz" ] && [ -x "$BIN/build_binary" ]; then
  exit 0
fi
# The Boost libraries KenLM's CMake build asks for, and zlib, from the machine's package manager.
packages=(libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev zlib1g-dev)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null
  else
    echo "KenLM's tools need ${missing[*]} (Debian names): install them, then run this again." >&2
    exit 1
  fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download -q --no-deps --no-binary kenlm "kenlm==$VERSION" -d "$work"
tar xzf "$work/kenlm-$VERSION.tar.gz" -C "$work"
cmake -S "$work/kenlm-$VERSION" -B "$work/build" -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log" 2>&1 \
  || { cat "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --target lmplz build_binary -j "$(nproc)" >"$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; exit 1; }
cp "$work/build/bin/lmplz" "$work/build/bin/build_binary" "$BIN/"
echo "installed $BIN/lmplz and $BIN/build_binary (KenLM $VERSION)"

#!/usr/bin/env bash
# Set up Sumie in a virtual environment (.venv by default).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --dev    plus the test oracles (diffusers, transformers, peft, k-diffusion, sd-mecha, lycoris-lora, tomesd), tools
#                             and Ray (the `ray` extra: sumie serve --ray is tested)
# torch is installed first and pinned, so pip never swaps in another build. Users with CUDA can choose one:
#   SUMIE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SUMIE_VENV:-.venv}
TORCH_SPEC=${SUMIE_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH_SPEC
if [ "${1:-}" = "--dev" ]; then
  "${PIP[@]}" -e ".[dev,ray]"
  # Reference code only (test oracles): their own dependency lists pull in packages we do not need.
  "${PIP[@]}" --no-deps "k-diffusion==0.1.1.post1" "sd-mecha==1.1.8" "lycoris-lora==4.1.3" "tomesd==0.1.3" "einops>=0.8" "toml>=0.10"
  # The browser test (tests/test_serve_browser.py, slow) drives Debian's chromium through Playwright (never
  # `playwright install`): installed here when apt can, else that test fails with a message saying so.
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } ||
      echo "setup: could not install Debian's chromium (needed by the browser test)" >&2
  fi
else
  "${PIP[@]}" -e .
fi
echo "sumie is set up in $VENV (activate with: source $VENV/bin/activate)"

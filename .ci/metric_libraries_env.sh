#!/usr/bin/env bash
# Builds (or reuses) a separate Python environment holding the paper's metric libraries, for
# .ci/metric_equivalence.py. It is separate because torchvision's wheels pull a CUDA build of torch
# (~5.6 GB), which the project's own installs must never do on a CPU machine.
# Usage: .ci/metric_libraries_env.sh ENV_DIR   -> exit 0 when ENV_DIR/bin/python has everything.
set -uo pipefail
env_dir="${1:?usage: $0 ENV_DIR}"
# Versions: torch/torchvision are the ones this CI machine has as local files; the libraries are the
# ones the paper's protocol names (torchmetrics' image extra, clean-fid) plus the original lpips.
packages=(torch==2.14.1 torchvision==0.29.1 "torchmetrics[image]==1.9.0" clean-fid==0.1.35 lpips==0.1.4 scipy
          numpy pillow)
# The project is not installed there: the check puts the repository on sys.path and imports only
# benchmarks.metrics (torch, numpy, PIL).
stamp="$env_dir/.kvpolicy-metric-env"
wanted="$(printf '%s\n' "${packages[@]}")"
if [ -x "$env_dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi
rm -rf "$env_dir"
python3 -m venv "$env_dir" || exit 1
"$env_dir/bin/python" -m pip install -q "${packages[@]}" || exit 1
"$env_dir/bin/python" -c "import torchvision, torchmetrics.image, cleanfid.fid, lpips, scipy.linalg" || exit 1
printf '%s' "$wanted" > "$stamp"

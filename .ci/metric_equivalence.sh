#!/usr/bin/env bash
# CI step "metric equivalence": kvpolicy's PSNR/SSIM/LPIPS/FID against torchmetrics, clean-fid and
# lpips on the same images and networks (.ci/metric_equivalence.py), in a separate environment made
# by .ci/metric_libraries_env.sh (default /tmp/kvp-metrics-env, reused when complete; override with
# KVPOLICY_METRIC_ENV). Where that environment cannot be made it says so and skips (exit 0), as it
# does when KVPOLICY_SKIP_METRIC_EQUIVALENCE is set; a failed comparison fails the step.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${KVPOLICY_SKIP_METRIC_EQUIVALENCE:-}" ]; then
    echo "SKIPPED metric equivalence: KVPOLICY_SKIP_METRIC_EQUIVALENCE is set"
    exit 0
fi
env_dir="${KVPOLICY_METRIC_ENV:-/tmp/kvp-metrics-env}"
started=$(date +%s)
build_log="$(mktemp -t kvp-metric-env.XXXXXX.log)"
if ! bash .ci/metric_libraries_env.sh "$env_dir" >"$build_log" 2>&1; then
    echo "SKIPPED metric equivalence: could not build the libraries' environment in $env_dir" \
         "(needs torch==2.14.1, torchvision==0.29.1, torchmetrics[image], clean-fid, lpips from pip; log: $build_log)"
    exit 0
fi
echo "libraries' environment ready in $(( $(date +%s) - started )) s ($env_dir)"
"$env_dir/bin/python" -W ignore .ci/metric_equivalence.py "$@"
status=$?
echo "metric equivalence step took $(( $(date +%s) - started )) s"
exit $status

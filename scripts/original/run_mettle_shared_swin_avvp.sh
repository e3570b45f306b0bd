#!/usr/bin/env bash
# Mettle, shared backbones, task avvp: extract the cache (resumes), then train with the reference settings.
# Usage: run_mettle_shared_swin_avvp.sh DATA_ROOT [--work DIR] [--visual-weights F] [--audio-weights F] [-- mettle-train options]
set -euo pipefail
data_root="${1:?usage: $0 DATA_ROOT [options]}"; shift
exec python "$(dirname "$0")/../run_original.py" shared avvp --data-root "$data_root" "$@"

#!/usr/bin/env bash
# Mettle, specific backbones, task ave: extract the cache (resumes), then train with the reference settings.
# Usage: run_mettle_specific_swin_htsat_ave.sh DATA_ROOT [--work DIR] [--visual-weights F] [--audio-weights F] [-- mettle-train options]
set -euo pipefail
data_root="${1:?usage: $0 DATA_ROOT [options]}"; shift
exec python "$(dirname "$0")/../run_original.py" specific ave --data-root "$data_root" "$@"

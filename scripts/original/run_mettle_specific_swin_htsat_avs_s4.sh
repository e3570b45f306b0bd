#!/usr/bin/env bash
# Mettle, specific backbones, task avs-s4: extract the cache (resumes), then train with the reference settings.
# Usage: run_mettle_specific_swin_htsat_avs_s4.sh DATA_ROOT [--work DIR] [--visual-weights F] [--audio-weights F] [-- mettle-train options]
set -euo pipefail
data_root="${1:?usage: $0 DATA_ROOT [options]}"; shift
exec python "$(dirname "$0")/../run_original.py" specific avs-s4 --data-root "$data_root" "$@"

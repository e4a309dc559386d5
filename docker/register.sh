#!/bin/sh
# Registers what a fresh cxr-screen stack needs; idempotent, so compose runs it on every start:
#   1. the results database migrated to the current schema (CXR_SCREEN_DATABASE_URL);
#   2. the process work pool and the fan-out deployments (screen-shard/shard on queue `shards`,
#      screen-fanout/reprocess-fanout on queue `control`);
#   3. the deployments of prefect.yaml (nightly with its schedule, reprocess, train).
# Needs PREFECT_API_URL (the server) and CXR_SCREEN_CODE_DIR (the folder holding prefect.yaml).
set -eu

: "${PREFECT_API_URL:?PREFECT_API_URL must point at the Prefect server, e.g. http://prefect-server:4200/api}"
code_dir="${CXR_SCREEN_CODE_DIR:?CXR_SCREEN_CODE_DIR must name the folder that holds prefect.yaml}"
pool="${CXR_SCREEN_WORK_POOL:-cxr-screen}"  # prefect.yaml names this pool too

echo "cxr-screen: migrating the results database"
cxr-screen db upgrade

echo "cxr-screen: work pool '${pool}' and the fan-out deployments"
cxr-screen fanout register --pool "${pool}"

echo "cxr-screen: deployments of ${code_dir}/prefect.yaml"
cd "${code_dir}"
prefect --no-prompt deploy --all

echo "cxr-screen: registered"

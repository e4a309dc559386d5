#!/bin/sh
# The Python packages benchmarks/bench_gpu_e2e.py needs on the lent GPU machine and that its
# image lacks (it has Python 3.12, torch, numpy, Pillow, typer, rich, httpx, jinja2, ...; not
# pydicom, Prefect, SQLAlchemy, pydantic, nvImageCodec), as cp312 manylinux wheels (without
# their dependencies: the list is what a screening run imports, measured, plus the small
# packages Prefect declares; apprise, Prefect's notifications, is left out; the pure-Python
# packages the image has too (anyio, httpx, click, typer, rich, ...) are carried at the versions
# tested here, so that only torch, numpy and Pillow come from the image), in two
# folders that each travel in one call (64 MiB per call with the working tree):
#
#   .whl-gpu  nvImageCodec, nvJPEG2000, nvJPEG                       (~39 MiB)
#   .whl-py   pydicom + codecs, Prefect (client and server), SQLAlchemy, pydantic, xxhash, ... (~45 MiB)
#
# Run here, from the repository root (it asks the package index for these exact files only):
#
#   sh benchmarks/gpu_wheels.sh
#
# then, on the GPU machine, two calls back to back (the second within the machine's 30 s warm
# window, so that the first call's install in .site/ is still there):
#
#   run(carry=[".whl-gpu"], timeout_s=300, command="python3 -m pip install -q --no-index
#       --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl-gpu/*.whl && ls .site")
#   run(carry=[".whl-py"], timeout_s=600, command="python3 -m pip install -q --no-index
#       --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl-py/*.whl &&
#       PYTHONPATH=$PWD/.site PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu_e2e.py --out $OUT")
#
# Versions: those installed in this repository's .venv (the tested set) where it has the
# package, else the ones pinned below (resolved for cp312 on 2026-11-29).
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EXCLUDE="$(git rev-parse --git-dir)/info/exclude"
mkdir -p "$(dirname "$EXCLUDE")"
for d in /.whl-gpu/ /.whl-py/ /.site/; do
    grep -qxF "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >> "$EXCLUDE"
done

# 0.8: the release whose Python API tasks/dicom/decoders/nvimgcodec.py was written from (0.9.0.20
# is newer; NVIMGCODEC=0.9.0.20 sh benchmarks/gpu_wheels.sh to try it)
GPU="nvidia-nvimgcodec-cu13==${NVIMGCODEC:-0.8.0.22} nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvjpeg==13.3.2.43"
PYPKGS="aiosqlite alembic amplitude-analytics annotated-types asgi-lifespan asyncpg beartype
burner-redis cachetools cffi coolname cronsim cryptography exceptiongroup fastapi graphviz
greenlet griffecli griffelib h2 hpack hyperframe jinja2-humanize-extension jsonpointer jsonschema
jsonschema-specifications mako opentelemetry-api orjson pendulum prefect py-key-value-aio
pydantic pydantic-core pydantic-extra-types pydantic-settings pydicom pydocket pylibjpeg
pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle python-dotenv python-multipart
python-slugify pytz redis referencing rfc3339-validator rpds-py sniffio sqlalchemy starlette
text-unidecode toml typing-inspection tzdata uncalled-for uvicorn websockets whenever pycparser
python-json-logger griffe jsonpatch semver readchar docker dateparser cyclopts ruamel-yaml
docstring-parser rich-rst tzlocal xxhash
anyio httpx httpcore h11 idna certifi click typer rich shellingham annotated-doc markdown-it-py
mdurl pygments pyyaml jinja2 markupsafe typing-extensions cloudpickle fsspec humanize packaging
pathspec prometheus-client python-dateutil six urllib3 charset-normalizer requests attrs colorama"

pinned() {  # name==version as installed here, else the name alone (pip picks the newest)
    "$PY" - "$@" <<'EOF'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
EOF
}

download() {  # folder, requirements...
    dir=$1; shift
    rm -rf "$dir"; mkdir -p "$dir"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}

# shellcheck disable=SC2086
download .whl-gpu $GPU
# shellcheck disable=SC2046,SC2086
download .whl-py $(pinned $PYPKGS)
du -sh .whl-gpu .whl-py

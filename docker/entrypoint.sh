#!/bin/sh
# Container entry point of the HAT Search api image.
# With no arguments: on first start (empty /data volume) generates the demo gallery and builds its index,
# then runs the service (python -m service, configured by HAT_* variables). With arguments: runs them
# instead (e.g. `python -m index_builder build ...`), so the same image serves as the index builder.
set -eu

DATA=${HAT_DATA:-/data}
GALLERY=${HAT_GALLERY:-$DATA/gallery}
INDEX_ROOT=${HAT_INDEX_ROOT:-$DATA/index}
MODEL=${HAT_MODEL:-/app/models/demo}

if [ "$#" -gt 0 ]; then
  exec "$@"
fi

if [ ! -f "$GALLERY/manifest.jsonl" ]; then
  echo "entrypoint: no gallery at $GALLERY: generating the 1,000-scene demo gallery (seed 1)"
  tmp="$GALLERY.tmp"
  rm -rf "$tmp"
  python -m training.synthetic --out "$tmp" --seed 1 --train 0 --val 0 --test 1000
  # the manifest's image paths are relative to it: moving the folder keeps it valid
  rm -rf "$GALLERY"
  mv "$tmp" "$GALLERY"
fi

if [ ! -e "$INDEX_ROOT/current" ]; then
  echo "entrypoint: no index at $INDEX_ROOT: building it from $GALLERY/manifest.jsonl"
  python -m index_builder build --gallery "$GALLERY/manifest.jsonl" --model "$MODEL" --out "$INDEX_ROOT" \
    --no-progress
fi

exec python -m service

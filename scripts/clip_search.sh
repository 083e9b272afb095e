#!/usr/bin/env bash
# SPP search on CLIP (both towers), on a GPU node: NPROC=8 bash scripts/clip_search.sh [CONFIG] [key=value ...]
# (default: CLIP-Large on COCO; configs/clip_large_flickr_search.yaml for Flickr30k)
exec bash "$(dirname "$0")/launch.sh" search configs/clip_large_coco_search.yaml "$@"

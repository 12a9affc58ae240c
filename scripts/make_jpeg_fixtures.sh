#!/bin/sh
# Writes tests/data/jpeg/: JPEG files in the layouts Pillow's own encoder cannot write (4:4:0, 4:1:1 and
# 4:1:0 chroma, arithmetic coding, restart markers, RGB without the YCbCr transform), made by libjpeg-turbo's
# cjpeg (Debian: libjpeg-turbo-progs) from one deterministic picture. The files are committed, so tests never
# need cjpeg; tests/test_jpeg.py compares our decoding of each with Pillow's.
set -eu
out=tests/data/jpeg
mkdir -p "$out"
src=$(mktemp --suffix=.ppm)
trap 'rm -f "$src"' EXIT
python3 - "$src" <<'PY'
import sys
w, h = 75, 53
rows = []
for y in range(h):
    for x in range(w):
        # Smooth ramps plus a deterministic texture: chroma detail for the upsamplers to differ on.
        t = (x * 7919 + y * 104729) % 61 - 30
        rows += [min(255, max(0, v)) for v in (x * 255 // w + t, y * 255 // h - t, (x + y) * 127 // (w + h) + 64 + t)]
with open(sys.argv[1], "wb") as f:
    f.write(b"P6\n%d %d\n255\n" % (w, h) + bytes(rows))
PY
cjpeg -quality 85 -sample 1x2 "$src" > "$out/sample_1x2_440.jpg"
cjpeg -quality 85 -sample 4x1 "$src" > "$out/sample_4x1_411.jpg"
cjpeg -quality 85 -sample 4x2 "$src" > "$out/sample_4x2_410.jpg"
cjpeg -quality 85 -progressive -sample 1x2 "$src" > "$out/progressive_440.jpg"
cjpeg -quality 85 -sample 2x2 -arithmetic "$src" > "$out/arithmetic_420.jpg"
cjpeg -quality 85 -sample 2x1 -arithmetic -progressive "$src" > "$out/arithmetic_progressive_422.jpg"
cjpeg -quality 85 -sample 2x2 -restart 1 "$src" > "$out/restart_420.jpg"
cjpeg -quality 90 -rgb "$src" > "$out/rgb_no_transform.jpg"
cjpeg -quality 85 -grayscale -arithmetic "$src" > "$out/grayscale_arithmetic.jpg"
cjpeg -quality 85 -sample 2x2 -dct float "$src" > "$out/encoded_float_dct_420.jpg"

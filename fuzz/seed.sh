#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ from the shared samples (corpus/ is gitignored; never commit it).
#   car_reader, mst_walk: the sample CARs under 1 MiB, as they are
#   drisl:                every distinct block of those CARs (up to 400 per CAR), plus the
#                         data-model fixtures' CBOR
#   mst_tree:             a few operation strings (it needs no real data)
#   firehose_commit:      real #commit and #sync frames and structured inputs, written by
#                         examples/firehose_seeds.rs (a plain `cargo run`, no sanitizer)
# Usage: fuzz/seed.sh            (ATPDB_SHARED defaults to ../shared beside the repository)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
shared="${ATPDB_SHARED:-$here/../../shared}"
samples="$shared/car-samples"
fixtures="$shared/atproto-interop-tests/data-model/data-model-fixtures.json"
[ -d "$samples" ] || { echo "no $samples (set ATPDB_SHARED)" >&2; exit 1; }

mkdir -p "$here"/corpus/{car_reader,drisl,mst_walk,mst_tree,firehose_commit}
for car in "$samples"/*.car; do
    if [ "$(stat -c %s "$car")" -le $((1 << 20)) ]; then
        cp "$car" "$here/corpus/car_reader/"
        cp "$car" "$here/corpus/mst_walk/"
    fi
done

python3 - "$samples" "$fixtures" "$here/corpus/drisl" <<'PY'
import base64, hashlib, json, os, sys
samples, fixtures, out = sys.argv[1:]

def varint(buf, pos):
    value = shift = 0
    while True:
        byte = buf[pos]; pos += 1
        value |= (byte & 0x7f) << shift; shift += 7
        if byte < 0x80:
            return value, pos

def save(data):
    with open(os.path.join(out, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)

for name in sorted(os.listdir(samples)):
    path = os.path.join(samples, name)
    if not name.endswith(".car") or os.path.getsize(path) > (1 << 20):
        continue
    buf = open(path, "rb").read()
    length, pos = varint(buf, 0)
    save(buf[pos:pos + length])  # the header is DRISL too
    pos += length
    count = 0
    while pos < len(buf) and count < 400:
        length, pos = varint(buf, pos)
        section = buf[pos:pos + length]
        pos += length
        # CIDv1: version, codec, hash code, digest length (all one-byte varints here), digest.
        save(section[4 + section[3]:])
        count += 1

if os.path.exists(fixtures):
    for fixture in json.load(open(fixtures)):
        data = fixture.get("cbor_base64")
        if data:
            save(base64.b64decode(data + "=" * (-len(data) % 4)))
PY

# mst_tree: inserts of short keys, tall keys and paths, a remove, a get.
printf '\x00\x01\x00\x02\x04\x05\x04\x06\x0c\x07\x0c\x08\x02\x01\x03\x02' > "$here/corpus/mst_tree/basic"
printf '\x04\x00\x04\x01\x04\x02\x04\x03\x06\x01\x07\x00\x08\x04abcd\x08\x04abce' > "$here/corpus/mst_tree/tall"

# firehose_commit: frames and structured inputs made from MemoryRepo commits.
(cd "$here" && cargo run --quiet --release --example firehose_seeds -- "$here/corpus/firehose_commit")

for target in car_reader drisl mst_walk mst_tree firehose_commit; do
    echo "$target: $(ls "$here/corpus/$target" | wc -l) seeds"
done

"""The caps on what a reader accepts from a checkpoint (hostile input), in one place.

Every cap bounds a reader's time and memory before anything is parsed or allocated. The
committer checks a save against the same caps before it publishes, so a save never commits
what a load would refuse. Callers read them as ``limits.NAME`` (module attributes), so a
test can lower one for the whole package.
"""

MAX_MANIFEST_BYTES = 64 << 20    # parsing costs up to ~20x this (docs/reliability.md)
MAX_INDEX_BYTES = 256 << 20      # parsing costs ~8x this for real indexes (docs/reliability.md)
MAX_INDEX_CHUNKS = 1 << 22       # ~4.2 x 10^6 chunks: parsed, ~0.4-0.7 KiB each at the peak
MAX_ELEMENTS = 1 << 50
MAX_NDIM = 32                    # numpy's historical limit; validation is linear in it
MAX_JSON_DEPTH = 64              # nesting of the manifest's JSON (metrics are user data)
MAX_DEFLATE_RATIO = 1032        # deflate cannot inflate more than this per input byte
MAX_JSON_COST_FACTOR = 20        # a manifest may take ~this x its size to parse (manifest.parse_cost)
JSON_COST_SLACK = 16 << 20
MAX_JSON_BYTES = 64 << 20        # a JSON metadata file of a checkpoint (config.json, metrics.json, ...)

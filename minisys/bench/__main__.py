"""python -m minisys bench NAME ... : dispatch to a benchmark program."""
from __future__ import annotations

import sys

BENCHMARKS = {
    "kv-cache": "minisys.bench.kv_cache",
    "attention": "minisys.bench.attention",
    "paged-kv": "minisys.bench.paged_kv",
    "throughput": "minisys.bench.throughput",
    "latency": "minisys.bench.latency",
    "chunked": "minisys.bench.chunked",
    "spec": "minisys.bench.spec",
    "serve": "minisys.bench.serve",
    "scheduling": "minisys.bench.scheduling",
    "soak": "minisys.bench.soak",
    "facts": "minisys.bench.facts",
    "tp": "minisys.bench.tp",
    "compound": "minisys.bench.compound",
    "structured": "minisys.bench.structured",
    "structured-library": "minisys.bench.structured_library",
    "dtype": "minisys.bench.dtype_speed",
    "gpu": "minisys.bench.gpu_check",
    "cluster": "minisys.bench.cluster",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m minisys bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    import importlib
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

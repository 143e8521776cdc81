#!/usr/bin/env python3
"""Print the criterion results of `cargo bench --bench envelope --bench range_read` as a table.

Reads the latest estimates that criterion wrote under target/criterion, prints each benchmark's
median time and throughput, and the ratios that BENCHMARKS.md tracks. The groups of one
`cargo bench` run are measured one after another, so on a shared machine these ratios drift
with the load. `cargo bench --bench ratios` measures the same pairs interleaved.

Usage: benches/report.py [CRITERION_DIR]   (default: target/criterion)
"""

import json
import pathlib
import sys

GIB = 1 << 30


def load(root):
    """Maps each benchmark's full id to (median seconds, bytes per iteration or None)."""
    results = {}
    for benchmark in root.glob("**/new/benchmark.json"):
        meta = json.loads(benchmark.read_text())
        estimates = json.loads((benchmark.parent / "estimates.json").read_text())
        seconds = estimates["median"]["point_estimate"] / 1e9
        throughput = (meta.get("throughput") or {}).get("Bytes")
        results[meta["full_id"]] = (seconds, throughput)
    return results


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    results = load(root)
    if not results:
        sys.exit(f"no criterion results under {root}: run `cargo bench --bench envelope` first")

    print(f"{'benchmark':<52} {'median':>12} {'GiB/s':>8}")
    for full_id in sorted(results):
        seconds, size = results[full_id]
        rate = f"{size / GIB / seconds:8.2f}" if size else f"{'':>8}"
        print(f"{full_id:<52} {seconds * 1e6:10.1f}µs {rate}")

    # (label, numerator, denominator, as throughput): throughput ratios divide denominator time
    # by numerator time, so above 1 means the numerator is faster.
    ratios = [
        ("encrypt 64 KiB frames / aes-gcm seal", "envelope_encrypt/frame 64KiB/64MiB",
         "aead_64KiB/aes-gcm seal/64MiB", True),
        ("decrypt 64 KiB frames / aes-gcm open", "envelope_decrypt/frame 64KiB/64MiB",
         "aead_64KiB/aes-gcm open/64MiB", True),
        ("encrypt 64 KiB frames / ring seal", "envelope_encrypt/frame 64KiB/64MiB",
         "aead_64KiB/ring seal/64MiB", True),
        ("decrypt 64 KiB frames / ring open", "envelope_decrypt/frame 64KiB/64MiB",
         "aead_64KiB/ring open/64MiB", True),
        ("range first chunk: last MiB / first MiB", "range_read/first_chunk/last MiB",
         "range_read/first_chunk/first MiB", False),
        ("range whole MiB: last MiB / first MiB", "range_read/whole_MiB/last MiB",
         "range_read/whole_MiB/first MiB", False),
    ]
    print()
    for label, numerator, denominator, throughput in ratios:
        if numerator not in results or denominator not in results:
            continue
        top, bottom = results[numerator][0], results[denominator][0]
        ratio = bottom / top if throughput else top / bottom
        print(f"{label:<52} {ratio:6.3f}")


if __name__ == "__main__":
    main()

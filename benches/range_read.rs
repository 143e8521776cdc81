//! Range-read cost against the offset of the range: the first MiB and the last MiB of a 1 GiB
//! message (64 KiB frames) held in memory, read as the gateway reads a `Range` request
//! (`Message::read_range` in `common`).
//!
//! - `range_read/first_chunk`: until the first plaintext is released (the first 256 KiB chunk).
//! - `range_read/whole_MiB`: the whole MiB.
//!
//! Run with `cargo bench --bench range_read`. Test mode (`cargo test`) uses an 8 MiB message.

mod common;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput};

use common::{CHUNK_LEN, KIB, MIB, Message, MessageKeys, benchmarking, plaintext};

const FRAME_LENGTH: usize = 64 * KIB;

fn range_read(c: &mut Criterion) {
    let plaintext_len = if benchmarking() { 1024 * MIB } else { 8 * MIB };
    let message = Message::new(
        &MessageKeys::generate(),
        &plaintext(plaintext_len),
        FRAME_LENGTH,
    );
    let end = plaintext_len as u64;
    let ranges = [
        ("first MiB", 0..MIB as u64),
        ("last MiB", end - MIB as u64..end),
    ];
    let mut out = BytesMut::with_capacity(CHUNK_LEN + FRAME_LENGTH);

    let mut group = c.benchmark_group("range_read");
    for (label, range) in &ranges {
        group.bench_function(BenchmarkId::new("first_chunk", label), |b| {
            b.iter(|| message.read_range(range.clone(), true, &mut out))
        });
    }
    group.throughput(Throughput::Bytes(MIB as u64));
    for (label, range) in &ranges {
        group.bench_function(BenchmarkId::new("whole_MiB", label), |b| {
            b.iter(|| {
                let released = message.read_range(range.clone(), false, &mut out);
                assert_eq!(released, MIB);
            })
        });
    }
    group.finish();
}

fn main() {
    let mut criterion = common::criterion().configure_from_args();
    range_read(&mut criterion);
    criterion.final_summary();
}

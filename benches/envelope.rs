//! Envelope throughput against the raw AEAD it is built on.
//!
//! - `aead_64KiB`: AES-256-GCM seal and open of the same bytes in 64 KiB pieces, with `aes-gcm`
//!   0.11 (the crate the envelope uses) and with `ring` 0.17 (the fastest AES-GCM on x86-64 with
//!   VAES). Each piece is copied into a reused buffer and then sealed or opened in place, as the
//!   envelope does with a frame. `aes-gcm seal, no copy` leaves the copy out, to show its cost.
//! - `envelope_encrypt` and `envelope_decrypt`: whole messages through `Encryptor` and
//!   `Decryptor` with frame lengths of 4 KiB, 64 KiB and 1 MiB, on 1 MiB and 64 MiB objects.
//!   Input arrives in 256 KiB chunks and the output buffer is reused.
//! - `envelope_encrypt_16KiB_chunks`: 64 KiB frames fed 16 KiB at a time, the most that one TLS
//!   record delivers, so every frame is gathered in the encryptor's buffer first.
//!
//! Run with `cargo bench --bench envelope`. The groups run one after another, so on a shared
//! machine their ratios drift with the load; `cargo bench --bench ratios` measures the same
//! pairs interleaved.

mod common;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput};

use common::{CHUNK_LEN, KIB, MIB, Message, MessageKeys, RawAead, benchmarking, plaintext};

const FRAME_LENGTHS: [usize; 3] = [4 * KIB, 64 * KIB, MIB];
/// Input chunk of the `envelope_encrypt_16KiB_chunks` group.
const RECORD_CHUNK_LEN: usize = 16 * KIB;

/// Returns the object sizes to measure: 1 MiB and 64 MiB, or 1 MiB and 2 MiB in test mode.
fn object_sizes() -> [usize; 2] {
    if benchmarking() {
        [MIB, 64 * MIB]
    } else {
        [MIB, 2 * MIB]
    }
}

fn aead_64k(c: &mut Criterion) {
    let aead = RawAead::new();
    let mut group = c.benchmark_group("aead_64KiB");
    for size in object_sizes() {
        let input = plaintext(size);
        let sealed = aead.seal_all(&input);
        let mut in_place = input.clone();
        let mut buffer = Vec::with_capacity(common::PIECE_LEN);
        let label = size_label(size);
        group.throughput(Throughput::Bytes(size as u64));

        group.bench_function(BenchmarkId::new("aes-gcm seal", &label), |b| {
            b.iter(|| aead.aes_gcm_seal(&input, &mut buffer))
        });
        group.bench_function(BenchmarkId::new("aes-gcm open", &label), |b| {
            b.iter(|| aead.aes_gcm_open(&sealed, &mut buffer))
        });
        group.bench_function(BenchmarkId::new("aes-gcm seal, no copy", &label), |b| {
            b.iter(|| aead.aes_gcm_seal_no_copy(&mut in_place))
        });
        group.bench_function(BenchmarkId::new("ring seal", &label), |b| {
            b.iter(|| aead.ring_seal(&input, &mut buffer))
        });
        group.bench_function(BenchmarkId::new("ring open", &label), |b| {
            b.iter(|| aead.ring_open(&sealed, &mut buffer))
        });
    }
    group.finish();
}

fn envelope_encrypt(c: &mut Criterion) {
    let keys = MessageKeys::generate();
    let mut group = c.benchmark_group("envelope_encrypt");
    for size in object_sizes() {
        let input = plaintext(size);
        group.throughput(Throughput::Bytes(size as u64));
        for frame_length in FRAME_LENGTHS {
            let id = BenchmarkId::new(frame_label(frame_length), size_label(size));
            let mut out = BytesMut::with_capacity(CHUNK_LEN + 2 * frame_length + 64);
            group.bench_function(id, |b| {
                b.iter(|| keys.encrypt(&input, frame_length, CHUNK_LEN, &mut out))
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("envelope_encrypt_16KiB_chunks");
    let size = object_sizes()[1];
    let input = plaintext(size);
    let frame_length = 64 * KIB;
    let mut out = BytesMut::with_capacity(CHUNK_LEN + 2 * frame_length + 64);
    group.throughput(Throughput::Bytes(size as u64));
    let id = BenchmarkId::new(frame_label(frame_length), size_label(size));
    group.bench_function(id, |b| {
        b.iter(|| keys.encrypt(&input, frame_length, RECORD_CHUNK_LEN, &mut out))
    });
    group.finish();
}

fn envelope_decrypt(c: &mut Criterion) {
    let keys = MessageKeys::generate();
    let mut group = c.benchmark_group("envelope_decrypt");
    for size in object_sizes() {
        let input = plaintext(size);
        group.throughput(Throughput::Bytes(size as u64));
        for frame_length in FRAME_LENGTHS {
            let message = Message::new(&keys, &input, frame_length);
            let mut out = BytesMut::with_capacity(CHUNK_LEN + 2 * frame_length);
            let id = BenchmarkId::new(frame_label(frame_length), size_label(size));
            group.bench_function(id, |b| {
                b.iter(|| {
                    let released = message.decrypt(&mut out);
                    assert_eq!(released, size);
                })
            });
        }
    }
    group.finish();
}

fn frame_label(frame_length: usize) -> String {
    format!("frame {}", size_label(frame_length))
}

/// Formats a size as criterion's parameter label: `4KiB`, `64MiB`.
fn size_label(bytes: usize) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{}MiB", bytes / MIB)
    } else {
        format!("{}KiB", bytes / KIB)
    }
}

fn main() {
    let mut criterion = common::criterion().configure_from_args();
    aead_64k(&mut criterion);
    envelope_encrypt(&mut criterion);
    envelope_decrypt(&mut criterion);
    criterion.final_summary();
}

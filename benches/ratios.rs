//! The envelope's performance ratios, each measured with its two sides interleaved.
//!
//! On a shared machine the load changes within seconds, so two criterion groups measured one
//! after the other can differ by more than the effect being measured. Here every round times
//! side A and side B back to back (alternating which goes first), each round yields one ratio,
//! and the median over the rounds is printed with the lower and upper quartiles.
//!
//! | ratio | target |
//! |---|---|
//! | envelope encrypt / `aes-gcm` seal, 64 KiB frames, 64 MiB | at least 0.9 |
//! | envelope decrypt / `aes-gcm` open | at least 0.85 |
//! | the same two against `ring` | (reported) |
//! | time to the first chunk of a range read: last MiB / first MiB of 1 GiB | at most 2 |
//!
//! Throughput ratios are B time / A time, so above 1 means the envelope is faster. Run with
//! `cargo bench --bench ratios`; test mode (`cargo test`) runs one small round.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;

use common::{CHUNK_LEN, KIB, MIB, Message, MessageKeys, RawAead, benchmarking, plaintext};

const FRAME_LENGTH: usize = 64 * KIB;
/// Range reads of each end per round when benchmarking: one read takes well under a millisecond.
const RANGE_READS_PER_ROUND: usize = 50;

/// One measured pair: `envelope` against `reference`.
struct Pair<'a> {
    name: &'static str,
    envelope: Box<dyn FnMut() + 'a>,
    reference: Box<dyn FnMut() + 'a>,
    /// Whether the ratio is reference time / envelope time (throughput) rather than
    /// envelope time / reference time (cost).
    throughput: bool,
}

fn main() {
    let benchmarking = benchmarking();
    let (rounds, object_len, range_message_len, range_reads) = if benchmarking {
        (31, 64 * MIB, 1024 * MIB, RANGE_READS_PER_ROUND)
    } else {
        (1, MIB, 8 * MIB, 1)
    };

    let keys = MessageKeys::generate();
    let aead = RawAead::new();
    let input = plaintext(object_len);
    let sealed = aead.seal_all(&input);
    let message = Message::new(&keys, &input, FRAME_LENGTH);
    let range_message = Message::new(&keys, &plaintext(range_message_len), FRAME_LENGTH);
    let end = range_message_len as u64;

    // Every closure owns its output buffer and borrows the inputs.
    let (keys, aead, input, sealed) = (&keys, &aead, &input[..], &sealed);
    let (message, range_message) = (&message, &range_message);
    let envelope_out = || BytesMut::with_capacity(CHUNK_LEN + 2 * FRAME_LENGTH + 64);
    let reference_out = || Vec::with_capacity(FRAME_LENGTH);
    let encrypt = || {
        let mut out = envelope_out();
        move || {
            keys.encrypt(input, FRAME_LENGTH, CHUNK_LEN, &mut out);
        }
    };
    let decrypt = || {
        let mut out = envelope_out();
        move || {
            message.decrypt(&mut out);
        }
    };
    let read_range = |range: std::ops::Range<u64>| {
        let mut out = envelope_out();
        move || {
            for _ in 0..range_reads {
                range_message.read_range(range.clone(), true, &mut out);
            }
        }
    };

    let mut pairs = vec![
        Pair {
            name: "encrypt / aes-gcm seal",
            envelope: Box::new(encrypt()),
            reference: Box::new({
                let mut out = reference_out();
                move || aead.aes_gcm_seal(input, &mut out)
            }),
            throughput: true,
        },
        Pair {
            name: "decrypt / aes-gcm open",
            envelope: Box::new(decrypt()),
            reference: Box::new({
                let mut out = reference_out();
                move || aead.aes_gcm_open(sealed, &mut out)
            }),
            throughput: true,
        },
        Pair {
            name: "encrypt / ring seal",
            envelope: Box::new(encrypt()),
            reference: Box::new({
                let mut out = reference_out();
                move || aead.ring_seal(input, &mut out)
            }),
            throughput: true,
        },
        Pair {
            name: "decrypt / ring open",
            envelope: Box::new(decrypt()),
            reference: Box::new({
                let mut out = reference_out();
                move || aead.ring_open(sealed, &mut out)
            }),
            throughput: true,
        },
        Pair {
            name: "range first chunk: last MiB / first MiB",
            envelope: Box::new(read_range(end - MIB as u64..end)),
            reference: Box::new(read_range(0..MIB as u64)),
            throughput: false,
        },
    ];

    println!(
        "{rounds} interleaved rounds; objects of {} MiB, range reads of a {} MiB message",
        object_len / MIB,
        range_message_len / MIB
    );
    println!(
        "{:<42} {:>7} {:>7} {:>7}   {:>12} {:>12}",
        "ratio", "q1", "median", "q3", "envelope", "reference"
    );
    for pair in &mut pairs {
        let mut ratios = Vec::with_capacity(rounds);
        let mut envelope_times = Vec::with_capacity(rounds);
        let mut reference_times = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let (envelope, reference) = if round % 2 == 0 {
                let envelope = time(&mut pair.envelope);
                (envelope, time(&mut pair.reference))
            } else {
                let reference = time(&mut pair.reference);
                (time(&mut pair.envelope), reference)
            };
            let ratio = if pair.throughput {
                reference.as_secs_f64() / envelope.as_secs_f64()
            } else {
                envelope.as_secs_f64() / reference.as_secs_f64()
            };
            ratios.push(ratio);
            envelope_times.push(envelope);
            reference_times.push(reference);
        }
        let [q1, median, q3] = quartiles(&mut ratios);
        let describe = |times: &mut Vec<Duration>| {
            times.sort_unstable();
            let median = times[times.len() / 2];
            if pair.throughput {
                format!(
                    "{:.2} GiB/s",
                    object_len as f64 / (1u64 << 30) as f64 / median.as_secs_f64()
                )
            } else {
                format!("{:.1} µs", median.as_secs_f64() * 1e6 / range_reads as f64)
            }
        };
        println!(
            "{:<42} {q1:>7.3} {median:>7.3} {q3:>7.3}   {:>12} {:>12}",
            pair.name,
            describe(&mut envelope_times),
            describe(&mut reference_times)
        );
    }
}

fn time(routine: &mut Box<dyn FnMut() + '_>) -> Duration {
    let started = Instant::now();
    routine();
    started.elapsed()
}

/// Returns the lower quartile, median and upper quartile of `values` (nearest rank).
fn quartiles(values: &mut [f64]) -> [f64; 3] {
    values.sort_unstable_by(f64::total_cmp);
    let at = |fraction: f64| values[((values.len() - 1) as f64 * fraction).round() as usize];
    [at(0.25), at(0.5), at(0.75)]
}

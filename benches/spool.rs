//! The disk cost of spooling one webhook event while storage is unreachable: `Spool::put` (write,
//! fsync, rename, directory fsync) and then `Spool::remove` (unlink, directory fsync), as the
//! drainer removes each delivered file. Message sizes: 8 KiB, about a `call_ended` event with a
//! short transcript, and 1 MiB, an event of a call that lasted most of an hour.
//!
//! The spool directory is a temporary directory under `TMPDIR` (default `/tmp`), so the figures
//! describe that disk. Run with `cargo bench --bench spool`.

mod common;

use bytes::Bytes;
use callseal::ids::{ArtifactName, CallId, ObjectId, PracticeId};
use callseal::metrics::Metrics;
use callseal::webhook::spool::Spool;
use criterion::{BenchmarkId, Criterion, Throughput};

use common::{KIB, MIB};

fn spool_round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a Tokio runtime");
    let directory = tempfile::tempdir().expect("create the spool directory");
    let spool = Spool::open(directory.path(), u64::MAX, Metrics::new()).expect("open the spool");
    let id = ObjectId::new(
        PracticeId::new("clinic-1").expect("a valid practice id"),
        CallId::new("call_bench").expect("a valid call id"),
        ArtifactName::new("event-call_ended.v0000000000001-0000000000000000.json")
            .expect("a valid artifact name"),
    );

    let mut group = c.benchmark_group("spool");
    for (label, size) in [("8 KiB", 8 * KIB), ("1 MiB", MIB)] {
        let message = Bytes::from(vec![0x5a; size]);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("put_and_remove", label), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    spool
                        .put(&id, message.clone())
                        .await
                        .expect("spool a message");
                    let spooled = spool.list().pop().expect("the spooled message");
                    spool.remove(&spooled).await.expect("remove the message");
                })
            })
        });
    }
    group.finish();
}

fn main() {
    let mut criterion = common::criterion().configure_from_args();
    spool_round_trip(&mut criterion);
    criterion.final_summary();
}

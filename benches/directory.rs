//! Directory cache benchmarks (`cargo bench --bench directory`):
//! - `hit`: a lookup answered from a fresh cache entry (the request path's common case);
//! - `cold_miss`: one lookup of an ASID not cached, through an in-memory backend;
//! - `coalesced_miss/100`: 100 concurrent lookups of one cold ASID (one backend query);
//!   criterion reports the time per batch and, as throughput, per lookup.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::future::{join_all, BoxFuture};
use ssp_gateway::directory::ldif::LdifBackend;
use ssp_gateway::directory::{CachePolicy, Directory, DirectoryBackend, DirectoryError, Party};

const PROVIDER_ASID: &str = "918999198993";
const CALLERS: usize = 100;

/// Answers every ASID with the development provider's party, from memory, counting queries.
struct InMemory {
    party: Party,
    queries: AtomicU64,
}

impl DirectoryBackend for InMemory {
    fn name(&self) -> &'static str {
        "in-memory"
    }

    fn party<'a>(&'a self, asid: &'a str) -> BoxFuture<'a, Result<Option<Party>, DirectoryError>> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let mut party = self.party.clone();
        party.system.asid = asid.to_string();
        Box::pin(std::future::ready(Ok(Some(party))))
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), DirectoryError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

fn directory() -> (Directory, Arc<InMemory>) {
    let world = LdifBackend::development_world().expect("development world");
    let backend = Arc::new(InMemory {
        party: world.lookup(PROVIDER_ASID).expect("provider"),
        queries: AtomicU64::new(0),
    });
    let as_dyn: Arc<dyn DirectoryBackend> = backend.clone();
    (Directory::new(as_dyn, CachePolicy::default()), backend)
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let (dir, _) = directory();
    rt.block_on(dir.party(PROVIDER_ASID)).expect("warm");
    c.bench_function("directory/hit", |b| {
        b.to_async(&rt).iter(|| async {
            let party = dir.party(std::hint::black_box(PROVIDER_ASID)).await;
            std::hint::black_box(party.is_ok())
        })
    });

    // Fresh ASIDs so every lookup is cold; the cache is emptied between batches of keys.
    let (dir, backend) = directory();
    let next = AtomicU64::new(100_000_000_000);
    let fresh = || next.fetch_add(1, Ordering::Relaxed).to_string();
    c.bench_function("directory/cold_miss", |b| {
        b.to_async(&rt).iter_batched(
            fresh,
            |asid| {
                let dir = dir.clone();
                async move {
                    let party = dir.party(&asid).await;
                    std::hint::black_box(party.is_ok())
                }
            },
            BatchSize::SmallInput,
        )
    });

    let mut group = c.benchmark_group("directory/coalesced_miss");
    group.throughput(Throughput::Elements(CALLERS as u64));
    let before = backend.queries.load(Ordering::Relaxed);
    let mut batches = 0u64;
    group.bench_function(format!("{CALLERS}"), |b| {
        b.to_async(&rt).iter_batched(
            || {
                batches += 1;
                fresh()
            },
            |asid| {
                let dir = dir.clone();
                async move {
                    let lookups = (0..CALLERS).map(|_| dir.party(&asid));
                    let answers = join_all(lookups).await;
                    std::hint::black_box(answers.iter().all(Result::is_ok))
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    let queries = backend.queries.load(Ordering::Relaxed) - before;
    assert_eq!(
        queries, batches,
        "every batch of {CALLERS} concurrent misses made exactly one backend query"
    );
}

criterion_group! {
    name = cache;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = benches
}
criterion_main!(cache);

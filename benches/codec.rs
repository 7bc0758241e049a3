//! Avro in Confluent framing, both directions, on simulated payments: the first and last stage
//! of the in-process path. The registry is the in-process stand-in; after the first record
//! every schema lookup is a cache hit, as in production.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kscore::sink::FramedEncoder;
use kscore::source::Decoder;
use kscore::tools::registry_standin::{Store, spawn_local};
use kscore::tools::simulator::Simulator;
use kscore::{schemas, wire};
use schema_registry_converter::async_impl::schema_registry::SrSettings;

fn codec(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (url, _registry) = rt
        .block_on(spawn_local(Store::in_memory()))
        .expect("registry");
    let sr = SrSettings::new_builder(url)
        .no_proxy()
        .build()
        .expect("settings");
    let encoder = rt
        .block_on(FramedEncoder::register(
            &sr,
            "bench-value",
            schemas::PAYMENT_AVSC,
        ))
        .expect("register");
    let decoder = Decoder::new(sr, schemas::payment().expect("schema").clone());

    const N: usize = 10_000;
    let payments: Vec<_> = Simulator::new(Default::default())
        .expect("sim")
        .take(N)
        .map(|(p, _)| p)
        .collect();
    let values: Vec<_> = payments.iter().map(|p| p.to_value()).collect();
    let frames: Vec<Vec<u8>> = values
        .iter()
        .map(|v| encoder.encode(v.clone()).expect("encode"))
        .collect();
    rt.block_on(decoder.decode(Some(&frames[0])))
        .expect("warm the schema cache");

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("encode_payment", |b| {
        let mut out = Vec::with_capacity(512);
        b.iter(|| {
            for v in &values {
                out.clear();
                encoder.encode_into(v.clone(), &mut out).expect("encode");
            }
        })
    });
    g.bench_function("frame_parse", |b| {
        b.iter(|| {
            frames
                .iter()
                .map(|f| wire::parse(Some(f)).map_or(0, |(id, d)| id as usize + d.len()))
                .sum::<usize>()
        })
    });
    g.bench_function("decode_payment", |b| {
        b.iter(|| {
            rt.block_on(async {
                for f in &frames {
                    decoder.decode(Some(f)).await.expect("decode");
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);

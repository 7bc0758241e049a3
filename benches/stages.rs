//! The in-process stages on simulated payments, one core each, and the whole in-process path:
//! decode → features → score with the shipped models → scored record → encode. Each reports
//! events (or rows) per second (`Throughput::Elements`). Needs `ORT_DYLIB_PATH` (set by
//! `eval "$(scripts/stack.sh env)"`).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use apache_avro::types::Value;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kscore::features::{Event, FeatureSet, FeatureState};
use kscore::scorer::{ScoringSession, runtime};
use kscore::sink::FramedEncoder;
use kscore::sink::decision::Rules;
use kscore::sink::record::{self, Provenance, ScoreValue, ScoredEncoder, ScoredRecord};
use kscore::source::Decoder;
use kscore::tools::registry_standin::{Store, spawn_local};
use kscore::tools::simulator::{SimConfig, Simulator};
use kscore::{schemas, topology};
use schema_registry_converter::async_impl::schema_registry::SrSettings;

/// The binary's allocator (see Cargo.toml), so the stages are measured as the processor runs
/// them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const N: usize = 20_000;

struct Fixture {
    rt: tokio::runtime::Runtime,
    loaded: topology::Loaded,
    set: FeatureSet,
    decoder: Decoder,
    scored: FramedEncoder,
    frames: Vec<Vec<u8>>,
    values: Vec<Value>,
    long: LongHistory,
}

/// Keys with a long history, as cards have after weeks in production: 1,000 cards, each seen
/// every 2.5 minutes of event time; after 100,000 events a key holds ~100 events of its 7-day
/// windows when the measured 20,000 arrive (and ~120 by their end).
struct LongHistory {
    /// The state after the first 100,000 events.
    warm: FeatureState,
    values: Vec<Value>,
    frames: Vec<Vec<u8>>,
}

/// Events per partition between two commits, as the pipeline checkpoints feature state: about
/// a 100 ms cycle of a backlog over 4 partitions. A checkpoint starts a new undo log.
const CYCLE: usize = 1024;

/// Feeds `events` to `state`, checkpointing every [`CYCLE`] events.
fn update_in_cycles<'a>(
    set: &FeatureSet,
    mut state: FeatureState,
    events: impl IntoIterator<Item = Event<'a>>,
) -> FeatureState {
    for (i, e) in events.into_iter().enumerate() {
        state.update(set, e).expect("features");
        if i % CYCLE == CYCLE - 1 {
            state.checkpoint();
        }
    }
    state
}

fn fixture() -> Fixture {
    runtime::init(None).expect("ONNX Runtime: set ORT_DYLIB_PATH");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (url, _registry) = rt
        .block_on(spawn_local(Store::in_memory()))
        .expect("registry");
    let sr = SrSettings::new_builder(url)
        .no_proxy()
        .build()
        .expect("settings");
    let loaded = topology::load(Path::new("topologies/fraud.toml")).expect("shipped topology");
    let payment = rt
        .block_on(FramedEncoder::register(
            &sr,
            "bench-value",
            schemas::PAYMENT_AVSC,
        ))
        .expect("register");
    let scored_avsc = record::schema(&loaded.schema_text).expect("scored schema");
    let scored = rt
        .block_on(FramedEncoder::register(
            &sr,
            "bench-scored-value",
            &scored_avsc,
        ))
        .expect("register");
    let decoder = Decoder::new(sr, loaded.schema.clone());
    // The demo's world: many cards, each seen about every 50 minutes.
    let values: Vec<Value> = Simulator::new(SimConfig {
        cards: 20_000,
        events_per_sec: 6.7,
        ..SimConfig::default()
    })
    .expect("sim")
    .take(N)
    .map(|(p, _)| p.to_value())
    .collect();
    let frames: Vec<Vec<u8>> = values
        .iter()
        .map(|v| payment.encode(v.clone()).expect("encode"))
        .collect();
    rt.block_on(decoder.decode(Some(&frames[0])))
        .expect("warm the schema cache");
    let set = FeatureSet::new(&loaded.topology, &loaded.schema);
    let long = {
        let mut events = Simulator::new(SimConfig {
            cards: 1_000,
            events_per_sec: 6.7,
            ..SimConfig::default()
        })
        .expect("sim")
        .take(100_000 + N)
        .map(|(p, _)| p.to_value());
        let mut warm = FeatureState::default();
        for v in events.by_ref().take(100_000) {
            warm.update(&set, set.extract(&v, None).expect("extract"))
                .expect("features");
        }
        warm.checkpoint();
        let values: Vec<Value> = events.collect();
        let frames = values
            .iter()
            .map(|v| payment.encode(v.clone()).expect("encode"))
            .collect();
        LongHistory {
            warm,
            values,
            frames,
        }
    };
    Fixture {
        rt,
        loaded,
        set,
        decoder,
        scored,
        frames,
        values,
        long,
    }
}

/// Feature rows for every event, in order, from a state that saw them all.
fn feature_rows(f: &Fixture) -> Vec<Vec<f64>> {
    let mut state = FeatureState::default();
    f.values
        .iter()
        .map(|v| {
            state
                .update(&f.set, f.set.extract(v, None).expect("extract"))
                .expect("features")
        })
        .collect()
}

fn stages(c: &mut Criterion) {
    let f = fixture();
    let names = f.set.names();
    let rows = feature_rows(&f);
    let t = &f.loaded.topology;
    let columns: Vec<Vec<usize>> = t
        .models
        .iter()
        .map(|m| {
            m.features
                .iter()
                .map(|n| names.iter().position(|x| x == n).expect("feature"))
                .collect()
        })
        .collect();
    let mut sessions: Vec<ScoringSession> = t
        .models
        .iter()
        .zip(&f.loaded.model_paths)
        .map(|(m, p)| ScoringSession::open(m, p).expect("model"))
        .collect();
    let model_rows: Vec<Vec<f32>> = columns
        .iter()
        .map(|cols| {
            rows.iter()
                .flat_map(|r| cols.iter().map(|&c| r[c] as f32))
                .collect()
        })
        .collect();

    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    // As the pipeline decodes: the writer schema cached, the datum read in place.
    g.bench_function("decode", |b| {
        b.iter(|| {
            for fr in &f.frames {
                f.decoder
                    .decode_cached(Some(fr))
                    .expect("known")
                    .expect("decode");
            }
        })
    });
    // The generic decode (a value per record), as records of another writer schema get.
    g.bench_function("decode_value", |b| {
        b.iter(|| {
            f.rt.block_on(async {
                for fr in &f.frames {
                    f.decoder.decode_value(Some(fr)).await.expect("decode");
                }
            })
        })
    });
    g.bench_function("features", |b| {
        b.iter_batched(
            FeatureState::default,
            |state| {
                let events = f
                    .values
                    .iter()
                    .map(|v| f.set.extract(v, None).expect("extract"));
                update_in_cycles(&f.set, state, events)
            },
            BatchSize::LargeInput,
        )
    });
    let rest: Vec<Event<'_>> = f
        .long
        .values
        .iter()
        .map(|v| f.set.extract(v, None).expect("extract"))
        .collect();
    g.bench_function("features_long_history", |b| {
        b.iter_batched(
            || (f.long.warm.clone(), rest.clone()),
            |(state, events)| update_in_cycles(&f.set, state, events),
            BatchSize::LargeInput,
        )
    });
    for (((model, session), input), model_path) in t
        .models
        .iter()
        .zip(&mut sessions)
        .zip(&model_rows)
        .zip(&f.loaded.model_paths)
    {
        let width = model.features.len();
        let batch = model.batching.max_rows;
        g.bench_function(format!("score_{}_batch{batch}", model.name), |b| {
            b.iter(|| {
                for chunk in input.chunks(batch * width) {
                    session.score(chunk).expect("score");
                }
            })
        });
        // The tree ensemble a compiled model was built from (scripts/compile_trees.py), on the
        // same rows, for comparison.
        let path = model_path.with_file_name(format!("{}_trees.onnx", model.name));
        if path.exists() {
            let mut trees = ScoringSession::open(model, &path).expect("trees model");
            g.bench_function(format!("score_{}_trees_batch{batch}", model.name), |b| {
                b.iter(|| {
                    for chunk in input.chunks(batch * width) {
                        trees.score(chunk).expect("score");
                    }
                })
            });
        }
    }
    // (model, score within the model, template), as the pipeline builds them.
    let templates: Vec<(usize, usize, ScoreValue)> = t
        .models
        .iter()
        .enumerate()
        .flat_map(|(m, model)| {
            model.scores.iter().enumerate().map(move |(i, s)| {
                let template = ScoreValue {
                    model: model.name.as_str().into(),
                    version: "v".into(),
                    role: kscore::topology::Role::Primary,
                    score: s.name.clone(),
                    qualified: format!("{}.{}", model.name, s.name),
                    value: 0.1,
                };
                (m, i, template)
            })
        })
        .collect();
    let fixed: Vec<ScoreValue> = templates.iter().map(|(_, _, v)| v.clone()).collect();
    let qualified: Vec<String> = fixed.iter().map(|v| v.qualified.clone()).collect();
    let rules = Rules::new(&t.alerts, &qualified).expect("rules");
    // What the pipeline does per record: the rules by index, the names of those that fired.
    let decide = |values: &[ScoreValue], fired: &mut Vec<usize>| {
        let decision = rules.decide(values, fired);
        let names: Vec<String> = fired.iter().map(|r| rules.name(*r).to_string()).collect();
        (decision, names)
    };
    let prov = Provenance {
        processor: "bench",
        topology: &t.name,
        topic: &t.input.topic,
        partition: 0,
        offset: 0,
        schema_id: 1,
        processed_at: 0,
    };
    let fast = ScoredEncoder::new(f.scored.schema_id(), &f.loaded.schema, &names).expect("encoder");
    g.bench_function("scored_encode", |b| {
        let mut out = Vec::with_capacity(2048);
        let mut fired = Vec::new();
        b.iter(|| {
            for (frame, r) in f.frames.iter().zip(&rows) {
                let (decision, rules_fired) = decide(&fixed, &mut fired);
                out.clear();
                let record = ScoredRecord {
                    event: record::Event::Verbatim(&frame[5..]),
                    features: r,
                    scores: &fixed,
                    decision,
                    rules_fired: &rules_fired,
                    processing: prov.clone(),
                };
                fast.encode_into(&mut out, &record).expect("encode");
            }
        })
    });
    // Decode → features → scored record, with the changelog of each cycle encoded at its
    // checkpoint: the in-process path without the model calls (their scores fixed).
    let path_no_models = |state: &mut FeatureState, frames: &[Vec<u8>], out: &mut Vec<u8>| {
        let mut fired = Vec::new();
        let mut changelog = Vec::with_capacity(1 << 16);
        for (i, fr) in frames.iter().enumerate() {
            let d = f
                .decoder
                .decode_cached(Some(fr))
                .expect("known")
                .expect("decode");
            let e = f.set.extract(&d.record, None).expect("extract");
            let r = state.update(&f.set, e).expect("features");
            let (decision, rules_fired) = decide(&fixed, &mut fired);
            let value = d.into_event();
            let record = ScoredRecord {
                event: match &value {
                    None => record::Event::Verbatim(&fr[5..]),
                    Some(v) => record::Event::Value(v),
                },
                features: &r,
                scores: &fixed,
                decision,
                rules_fired: &rules_fired,
                processing: prov.clone(),
            };
            out.clear();
            fast.encode_into(out, &record).expect("encode");
            if i % CYCLE == CYCLE - 1 {
                changelog.clear();
                state
                    .changelog(&f.set, i as i64, |k, v| {
                        changelog.extend_from_slice(k);
                        changelog.extend_from_slice(v.unwrap_or_default());
                        Ok::<_, ()>(())
                    })
                    .expect("changelog");
                state.checkpoint();
            }
        }
    };
    g.bench_function("path_no_models", |b| {
        let mut out = Vec::with_capacity(2048);
        b.iter_batched(
            FeatureState::default,
            |mut state| {
                path_no_models(&mut state, &f.frames, &mut out);
                state
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("path_no_models_long_history", |b| {
        let mut out = Vec::with_capacity(2048);
        b.iter_batched(
            || f.long.warm.clone(),
            |mut state| {
                path_no_models(&mut state, &f.long.frames, &mut out);
                state
            },
            BatchSize::LargeInput,
        )
    });
    // The whole in-process path, one core: what a processor instance does per event apart
    // from Kafka itself.
    g.bench_function("in_process_path", |b| {
        let mut out = Vec::with_capacity(2048);
        let mut fired = Vec::new();
        let batch = 256;
        b.iter_batched(
            FeatureState::default,
            |mut state| {
                for (n, frames) in f.frames.chunks(batch).enumerate() {
                    if n % (CYCLE / batch) == 0 {
                        state.checkpoint();
                    }
                    let mut events = Vec::with_capacity(batch);
                    let mut feats = Vec::with_capacity(batch);
                    for fr in frames {
                        let d = f
                            .decoder
                            .decode_cached(Some(fr))
                            .expect("known")
                            .expect("decode");
                        let e = f.set.extract(&d.record, None).expect("extract");
                        feats.push(state.update(&f.set, e).expect("features"));
                        // The pipeline keeps each record's value (for its dead letter, and as
                        // the scored record's event bytes).
                        let value = d.into_event();
                        events.push((value, fr.to_vec()));
                    }
                    let mut scores: Vec<Vec<Vec<f64>>> = Vec::new();
                    for (session, cols) in sessions.iter_mut().zip(&columns) {
                        let input: Vec<f32> = feats
                            .iter()
                            .flat_map(|r| cols.iter().map(|&c| r[c] as f32))
                            .collect();
                        scores.push(session.score(&input).expect("score"));
                    }
                    for (i, ((event, value), r)) in events.into_iter().zip(&feats).enumerate() {
                        let values: Vec<ScoreValue> = templates
                            .iter()
                            .map(|(m, k, tpl)| ScoreValue {
                                value: scores[*m][*k][i],
                                ..tpl.clone()
                            })
                            .collect();
                        let (decision, rules_fired) = decide(&values, &mut fired);
                        let record = ScoredRecord {
                            event: match &event {
                                None => record::Event::Verbatim(&value[5..]),
                                Some(v) => record::Event::Value(v),
                            },
                            features: r,
                            scores: &values,
                            decision,
                            rules_fired: &rules_fired,
                            processing: prov.clone(),
                        };
                        out.clear();
                        fast.encode_into(&mut out, &record).expect("encode");
                    }
                }
                state
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);

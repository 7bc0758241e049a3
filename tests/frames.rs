//! A property test over the processor's in-process path: `KSCORE_FRAMES` (default 1,000,000)
//! random and mutated frames (valid payments with bytes flipped, cut short or extended, and
//! random bytes behind a valid header or none) through frame check → decode → features →
//! encode. No frame may panic, every refusal must carry one of the dead-letter reasons, and the
//! in-place reader (for frames of the reader schema) must accept, refuse and read exactly what
//! the generic apache-avro decoder does.
//!
//! The seed is printed first; `KSCORE_FRAMES_SEED=<seed>` replays a run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use apache_avro::Schema;
use kscore::features::{FeatureSet, FeatureState};
use kscore::reason::Reason;
use kscore::schemas;
use kscore::sink::record::{Event, Provenance, ScoreValue, ScoredEncoder, ScoredRecord};
use kscore::source::{Decoder, Record};
use kscore::tools::simulator::{SimConfig, Simulator};
use kscore::topology::config::Decision;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A newer producer schema: one more channel, one more optional field.
fn evolved() -> Schema {
    let mut v: serde_json::Value = serde_json::from_str(schemas::PAYMENT_AVSC).unwrap();
    for f in v["fields"].as_array_mut().unwrap() {
        if f["name"] == "channel" {
            f["type"]["symbols"]
                .as_array_mut()
                .unwrap()
                .push("CRYPTO".into());
        }
    }
    v["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "note", "type": ["null", "string"], "default": null}));
    Schema::parse_str(&v.to_string()).unwrap()
}

/// Valid frames to mutate: simulated payments, written with the reader schema (id 1) and with
/// the evolved one (id 2).
fn seeds() -> Vec<Vec<u8>> {
    let payment = schemas::payment().unwrap().clone();
    let evolved = evolved();
    fn writer(schema: &Schema) -> apache_avro::writer::datum::GenericDatumWriter<'_> {
        apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .unwrap()
    }
    let (w1, w2) = (writer(&payment), writer(&evolved));
    Simulator::new(SimConfig {
        cards: 50,
        ..SimConfig::default()
    })
    .unwrap()
    .take(200)
    .enumerate()
    .map(|(i, (p, _))| {
        let mut frame = Vec::new();
        if i % 2 == 0 {
            kscore::wire::write_header(&mut frame, 1);
            w1.write_value_ref(&mut frame, &p.to_value()).unwrap();
        } else {
            kscore::wire::write_header(&mut frame, 2);
            let apache_avro::types::Value::Record(mut fields) = p.to_value() else {
                unreachable!()
            };
            fields.push((
                "note".into(),
                apache_avro::types::Value::Union(
                    1,
                    Box::new(apache_avro::types::Value::String("n".into())),
                ),
            ));
            w2.write_value_ref(&mut frame, &apache_avro::types::Value::Record(fields))
                .unwrap();
        }
        frame
    })
    .collect()
}

/// One frame, made from the seeds by one of the mutations.
fn mutate(rng: &mut ChaCha8Rng, seeds: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut f = seeds[rng.random_range(0..seeds.len())].clone();
    match rng.random_range(0..9) {
        // Untouched.
        0 => {}
        // A few bytes flipped, anywhere (header included).
        1 => {
            for _ in 0..rng.random_range(1..=4) {
                let i = rng.random_range(0..f.len());
                f[i] ^= 1 << rng.random_range(0..8);
            }
        }
        // A byte replaced (varint lengths become huge or negative).
        2 => {
            let i = rng.random_range(5..f.len());
            f[i] = [0xff, 0x80, 0x7f, 0x00, 0x01][rng.random_range(0..5)];
        }
        // Cut short.
        3 => f.truncate(rng.random_range(0..f.len())),
        // Extended with random bytes.
        4 => {
            for _ in 0..rng.random_range(1..=32) {
                f.push(rng.random());
            }
        }
        // Random bytes behind a valid header (a known schema id or another).
        5 => {
            let id = [1u32, 2, 3, rng.random()][rng.random_range(0..4)];
            f.clear();
            kscore::wire::write_header(&mut f, id);
            for _ in 0..rng.random_range(0..300) {
                f.push(rng.random());
            }
        }
        // A slice of the datum repeated or removed.
        6 => {
            let a = rng.random_range(5..f.len());
            let b = rng.random_range(a..=f.len());
            if rng.random() {
                let slice = f[a..b].to_vec();
                f.splice(a..a, slice);
            } else {
                f.drain(a..b);
            }
        }
        // Random bytes, no header.
        7 => {
            f = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
        }
        // No value at all.
        _ => return None,
    }
    Some(f)
}

#[test]
fn random_and_mutated_frames_never_panic_and_every_refusal_has_a_reason() {
    let seed: u64 = std::env::var("KSCORE_FRAMES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().next_u64());
    let frames: usize = std::env::var("KSCORE_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    eprintln!("frames: {frames}, seed {seed} (replay with KSCORE_FRAMES_SEED={seed})");

    let loaded = kscore::topology::load_with(Path::new("topologies/fraud.toml"), false).unwrap();
    let payment = schemas::payment().unwrap().clone();
    let decoder = Decoder::with_writers(payment.clone(), [(1, payment.clone()), (2, evolved())])
        .expect("known writers");
    let set = FeatureSet::new(&loaded.topology, &loaded.schema);
    let names = set.names();
    let encoder = ScoredEncoder::new(3, &payment, &names).unwrap();
    let scores = vec![ScoreValue {
        model: "m".into(),
        version: "v".into(),
        role: kscore::topology::Role::Primary,
        score: "s".into(),
        qualified: "m.s".into(),
        value: 0.5,
    }];
    let reasons: HashSet<&str> = Reason::all().map(Reason::label).collect();
    let scored_schema = schemas::parse(schemas::SCORED_PAYMENT_AVSC).unwrap();
    let scored_reader = apache_avro::reader::datum::GenericDatumReader::builder(&scored_schema)
        .build()
        .unwrap();
    let seeds = seeds();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut state = FeatureState::default();
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut out = Vec::with_capacity(2048);
    let produced_at = 1_767_225_600_000 + 365 * 86_400_000;
    for n in 0..frames {
        let frame = mutate(&mut rng, &seeds);
        let outcome = catch_unwind(AssertUnwindSafe(|| -> &'static str {
            // The record read in place (writer = reader) must be what the generic decoder
            // makes of it: accepted or refused alike, with the same features' inputs.
            let generic = decoder.decode_value_known(frame.as_deref());
            let decoded = decoder.decode_known(frame.as_deref());
            let (decoded, value) = match (decoded, generic) {
                (Ok(d), Ok((_, v))) => (d, v),
                (Err(a), Err(b)) => {
                    assert_eq!(a.reason(), b.reason(), "frame {n}: {a} / {b}");
                    return a.reason().label();
                }
                (a, b) => panic!(
                    "frame {n}: the decoders disagree: {:?} / {:?}",
                    a.map(|_| "read"),
                    b.map(|_| "decoded")
                ),
            };
            let direct = matches!(decoded.record, Record::Direct(_));
            *kinds
                .entry(if direct { "direct" } else { "value" })
                .or_default() += 1;
            let extracted = set.extract(&decoded.record, Some(produced_at));
            let from_value = set.extract(&value, Some(produced_at));
            match (&extracted, &from_value) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "frame {n}: extracted inputs differ"),
                (Err(a), Err(b)) => {
                    assert_eq!(a.to_string(), b.to_string(), "frame {n}: errors differ")
                }
                (a, b) => panic!("frame {n}: extraction disagrees: {a:?} / {b:?}"),
            }
            let event = match extracted {
                Ok(e) => e,
                Err(e) => return e.reason().label(),
            };
            let features = match state.update(&set, event) {
                Ok(f) => f,
                Err(e) => return e.reason().label(),
            };
            let event = match (&frame, decoded.verbatim) {
                (Some(f), true) => Event::Verbatim(&f[5..]),
                _ => Event::Value(&value),
            };
            out.clear();
            let prov = Provenance {
                processor: "p",
                topology: "t",
                topic: "in",
                partition: 0,
                offset: n as i64,
                schema_id: decoded.schema_id,
                processed_at: produced_at,
            };
            let record = ScoredRecord {
                event,
                features: &features,
                scores: &scores,
                decision: Decision::Allow,
                rules_fired: &[],
                processing: prov,
            };
            match encoder.encode_into(&mut out, &record) {
                Ok(()) => {
                    // What is published reads back, with the event as it was decoded.
                    let mut body = &out[5..];
                    let back = scored_reader.read_value(&mut body).unwrap_or_else(|e| {
                        panic!("frame {n}: the scored record does not decode: {e}")
                    });
                    assert!(
                        body.is_empty(),
                        "frame {n}: bytes left over in the scored record"
                    );
                    let apache_avro::types::Value::Record(fields) = back else {
                        panic!("frame {n}: not a record")
                    };
                    assert_eq!(fields[0].1, value, "frame {n}: event differs");
                    "scored"
                }
                Err(_) => "unencodable",
            }
        }));
        let outcome = outcome.unwrap_or_else(|panic| {
            eprintln!(
                "frame {n} panicked (seed {seed}): {:02x?}",
                frame.as_deref().unwrap_or_default()
            );
            std::panic::resume_unwind(panic)
        });
        assert!(
            outcome == "scored" || reasons.contains(outcome),
            "frame {n} (seed {seed}): refused without a dead-letter reason: {outcome}"
        );
        *outcomes.entry(outcome).or_default() += 1;
        if n % 1_024 == 0 {
            state.checkpoint();
        }
    }
    eprintln!("outcomes: {outcomes:?}; decoded as {kinds:?}");
    // Both readers were exercised: the in-place one for the reader schema's writer, the generic
    // one for the evolved writer.
    assert!(
        kinds.get("direct").copied().unwrap_or(0) > frames as u64 / 20,
        "{kinds:?}"
    );
    assert!(
        kinds.get("value").copied().unwrap_or(0) > frames as u64 / 20,
        "{kinds:?}"
    );
    // The mutations reach every stage: plenty scored, and refusals of several kinds.
    assert!(
        outcomes.get("scored").copied().unwrap_or(0) > frames as u64 / 20,
        "{outcomes:?}"
    );
    for reason in ["not_confluent_framed", "unknown_schema_id", "undecodable"] {
        assert!(outcomes.contains_key(reason), "no {reason}: {outcomes:?}");
    }
}

//! Decoders and encoders give back everything they hold when dropped: a processor meeting many
//! writer schemas over its life (or a test making many decoders) does not grow. They used to
//! leak each schema (`Box::leak`) to hold a `'static` reader or writer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use apache_avro::Schema;
use kscore::schemas;
use kscore::sink::record::ScoredEncoder;
use kscore::source::Decoder;

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn decoders_and_encoders_free_their_schemas() {
    let payment = schemas::payment().unwrap().clone();
    let mut evolved: serde_json::Value = serde_json::from_str(schemas::PAYMENT_AVSC).unwrap();
    evolved["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "note", "type": ["null", "string"], "default": null}));
    let evolved = Schema::parse_str(&evolved.to_string()).unwrap();
    let make = || {
        let d = Decoder::with_writers(
            payment.clone(),
            [(1, payment.clone()), (2, evolved.clone())],
        )
        .unwrap();
        let e = ScoredEncoder::new(3, &payment, &["amount", "count_1h"]).unwrap();
        drop((d, e));
    };
    make();
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..500 {
        make();
    }
    let grown = LIVE.load(Ordering::Relaxed) - before;
    assert!(
        grown < 64 * 1024,
        "{grown} bytes still held after 500 decoders and encoders"
    );
}

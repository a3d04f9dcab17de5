//! Feeds arbitrary bytes to the pgoutput decoder, both to `decode` and to the in-place
//! `parse_change`, and fails on: a panic; a decoded message that holds more than its input could
//! carry; `decode` and `parse_change` disagreeing on an Insert, Update or Delete; or any single
//! allocation far larger than the input (a capacity taken from an untrusted count).
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use philotes::engine::source::pgoutput::{
    ChangeKind, Col, Column, Message, Value, decode, parse_change,
};

/// The System allocator, recording the largest single allocation since the last reset.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// The most one call may allocate at once for `len` input bytes. Every column or value the decoder
/// keeps takes at least one input byte, and none of its element types is larger than 64 bytes; the
/// constant covers the fixed reservations (Truncate's up to 1,024 ids).
fn allocation_bound(len: usize) -> usize {
    64 * len + 8192
}

fn check_tuple(t: &Vec<Value>, len: usize, consumed: &mut usize) {
    assert!(
        t.len() <= len,
        "tuple of {} values from {len} bytes",
        t.len()
    );
    assert!(
        t.capacity() * size_of::<Value>() <= allocation_bound(len),
        "tuple capacity {} from {len} bytes",
        t.capacity()
    );
    for v in t {
        *consumed += 1;
        if let Value::Text(b) | Value::Binary(b) = v {
            *consumed += 4 + b.len();
        }
    }
}

/// A decoded message claims no more than its input holds.
fn check_message(m: &Message, len: usize) {
    // Bytes of the input that the decoded fields account for, past the type byte.
    let mut consumed = 1;
    match m {
        Message::Begin { .. } => consumed += 20,
        Message::Commit { .. } => consumed += 25,
        Message::Origin => {}
        Message::Type {
            namespace, name, ..
        } => consumed += 4 + namespace.len() + 1 + name.len() + 1,
        Message::Relation(r) => {
            assert!(
                r.columns.capacity() * size_of::<Column>() <= allocation_bound(len),
                "relation capacity {} from {len} bytes",
                r.columns.capacity()
            );
            consumed += 4 + r.namespace.len() + 1 + r.name.len() + 1 + 1 + 2;
            for c in &r.columns {
                consumed += 1 + c.name.len() + 1 + 8;
            }
        }
        Message::Insert { new, .. } => {
            consumed += 5;
            check_tuple(new, len, &mut consumed);
        }
        Message::Update { old, new, .. } => {
            consumed += 5;
            if let Some(old) = old {
                consumed += 1;
                check_tuple(old, len, &mut consumed);
            }
            check_tuple(new, len, &mut consumed);
        }
        Message::Delete { old, .. } => {
            consumed += 5;
            check_tuple(old, len, &mut consumed);
        }
        Message::Truncate { rels, .. } => {
            assert!(rels.capacity() <= 1024.max(2 * rels.len()));
            consumed += 5 + 4 * rels.len();
        }
        Message::LogicalMessage { prefix, content } => {
            consumed += 9 + prefix.len() + 1 + 4 + content.len()
        }
    }
    // Tuples' column counts are two bytes each; the sums above leave them out, so this is a lower
    // bound of what the message must have read.
    assert!(
        consumed <= len,
        "{m:?} accounts for {consumed} bytes of a {len}-byte input"
    );
}

fn same_tuple(cols: &[Col], values: &[Value], input: &[u8]) -> bool {
    cols.len() == values.len()
        && cols.iter().zip(values).all(|(c, v)| match (c.kind, v) {
            (b'n', Value::Null) | (b'u', Value::UnchangedToast) => true,
            (b't', Value::Text(b)) | (b'b', Value::Binary(b)) => c.bytes(input) == &b[..],
            _ => false,
        })
}

fuzz_target!(|data: &[u8]| {
    let len = data.len();
    let input = Bytes::copy_from_slice(data);

    LARGEST.store(0, Ordering::Relaxed);
    let decoded = decode(input.clone());
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= allocation_bound(len),
        "decode allocated {largest} bytes at once for a {len}-byte input: {decoded:?}"
    );
    if let Ok(m) = &decoded {
        check_message(m, len);
    }

    let (mut old, mut new) = (Vec::new(), Vec::new());
    LARGEST.store(0, Ordering::Relaxed);
    let parsed = parse_change(&input, &mut old, &mut new);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= allocation_bound(len),
        "parse_change allocated {largest} bytes at once for a {len}-byte input"
    );
    for c in old.iter().chain(&new) {
        if c.is_value() {
            // In bounds of the message (this slices, so an out-of-range column panics).
            let _ = c.bytes(&input);
        }
    }

    // parse_change reads Insert, Update and Delete exactly as decode does.
    match (&parsed, &decoded) {
        (Err(_), _) if data.is_empty() => assert!(decoded.is_err()),
        (Ok(None), _) => assert!(!matches!(data[0], b'I' | b'U' | b'D')),
        (Err(_), Err(_)) => {}
        (Ok(Some((ChangeKind::Insert, rel))), Ok(Message::Insert { rel: r, new: n })) => {
            assert_eq!(rel, r);
            assert!(same_tuple(&new, n, data));
        }
        (
            Ok(Some((ChangeKind::Update { has_old }, rel))),
            Ok(Message::Update {
                rel: r,
                old: o,
                new: n,
            }),
        ) => {
            assert_eq!(rel, r);
            assert_eq!(*has_old, o.is_some());
            if let Some(o) = o {
                assert!(same_tuple(&old, o, data));
            }
            assert!(same_tuple(&new, n, data));
        }
        (Ok(Some((ChangeKind::Delete, rel))), Ok(Message::Delete { rel: r, old: o })) => {
            assert_eq!(rel, r);
            assert!(same_tuple(&old, o, data));
        }
        (p, d) => panic!("parse_change and decode disagree: {p:?} vs {d:?}"),
    }
});

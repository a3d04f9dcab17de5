//! Deterministic fuzzing of the pgoutput decoder on stable, in the ordinary `cargo test`: over a
//! million inputs (random bytes, and mutations of a valid message of every kind) go to both
//! `decode` and `parse_change`. Each call runs as it would in the engine, so a panic fails the test
//! (the input is printed first). Besides not panicking the decoder must: decode every valid message
//! to what was encoded; reject every truncation of one; reject a count or length larger than the
//! message; never hold more than its input could carry; never make one allocation far larger than
//! its input (a capacity taken from an untrusted count); and `parse_change` must read every Insert,
//! Update and Delete exactly as `decode` does. The coverage-guided fuzzer is in `fuzz/`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::mem::size_of;

use bytes::Bytes;
use philotes::engine::source::pgoutput::{
    ChangeKind, Col, Column, DecodeError, Message, Relation, Value, decode, parse_change,
};

// ---- the largest single allocation, per thread (the tests run in parallel) ----

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns what it returned and the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(|l| l.get()))
}

/// The most one call may allocate at once for `len` input bytes: every column or value the decoder
/// keeps takes at least one input byte and none of its element types is over 64 bytes; the
/// constant covers fixed reservations (Truncate's up to 1,024 relation ids).
fn allocation_bound(len: usize) -> usize {
    64 * len + 8192
}

// ---- a tiny deterministic PRNG: xorshift64* ----

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

// ---- valid messages of every kind, built field by field, with where their counts are ----

#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    /// A tuple's or a relation's column count (Int16).
    Count16,
    /// A column value's length (Int32).
    Len32,
    /// Truncate's relation count or a logical message's content length (Int32, read unsigned).
    Count32,
}

struct Seed {
    name: &'static str,
    bytes: Vec<u8>,
    expected: Message,
    /// Offsets of the counts and lengths in `bytes`.
    counts: Vec<(usize, Field)>,
}

#[derive(Clone, Copy)]
enum C {
    N,
    U,
    T(&'static [u8]),
    B(&'static [u8]),
}

#[derive(Default)]
struct Builder {
    buf: Vec<u8>,
    counts: Vec<(usize, Field)>,
}

impl Builder {
    fn new(tag: u8) -> Self {
        Builder {
            buf: vec![tag],
            counts: Vec::new(),
        }
    }
    fn put(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.put(&[v])
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    fn cstr(&mut self, s: &str) -> &mut Self {
        self.put(s.as_bytes()).u8(0)
    }
    fn count(&mut self, field: Field, n: usize) -> &mut Self {
        self.counts.push((self.buf.len(), field));
        match field {
            Field::Count16 => self.put(&(n as i16).to_be_bytes()),
            Field::Len32 | Field::Count32 => self.u32(n as u32),
        }
    }
    fn tuple(&mut self, cols: &[C]) -> Vec<Value> {
        self.count(Field::Count16, cols.len());
        cols.iter()
            .map(|c| match *c {
                C::N => {
                    self.u8(b'n');
                    Value::Null
                }
                C::U => {
                    self.u8(b'u');
                    Value::UnchangedToast
                }
                C::T(s) | C::B(s) => {
                    let text = matches!(c, C::T(_));
                    self.u8(if text { b't' } else { b'b' });
                    self.count(Field::Len32, s.len()).put(s);
                    let b = Bytes::from_static(s);
                    if text {
                        Value::Text(b)
                    } else {
                        Value::Binary(b)
                    }
                }
            })
            .collect()
    }
    fn seed(&mut self, name: &'static str, expected: Message) -> Seed {
        let b = std::mem::take(self);
        Seed {
            name,
            bytes: b.buf,
            expected,
            counts: b.counts,
        }
    }
}

/// The same messages as `fuzz/make_seeds.py` writes.
fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();

    let mut b = Builder::new(b'B');
    b.u64(0x16B_3748).i64(767_000_000_000_000).u32(742);
    out.push(b.seed(
        "begin",
        Message::Begin {
            final_lsn: 0x16B_3748,
            commit_time: 767_000_000_000_000,
            xid: 742,
        },
    ));

    let mut b = Builder::new(b'C');
    b.u8(0)
        .u64(0x16B_3748)
        .u64(0x16B_3778)
        .i64(767_000_000_000_123);
    out.push(b.seed(
        "commit",
        Message::Commit {
            commit_lsn: 0x16B_3748,
            end_lsn: 0x16B_3778,
            commit_time: 767_000_000_000_123,
        },
    ));

    let mut b = Builder::new(b'O');
    b.u64(0x16B_3000).cstr("node_a");
    out.push(b.seed("origin", Message::Origin));

    let mut b = Builder::new(b'R');
    b.u32(16384)
        .cstr("public")
        .cstr("orders")
        .u8(b'd')
        .count(Field::Count16, 3);
    let mut columns = Vec::new();
    for (key, name, oid, typmod) in [
        (true, "id", 20, -1),
        (false, "note", 25, -1),
        (false, "amount", 1700, 655_366),
    ] {
        b.u8(key as u8).cstr(name).u32(oid).i32(typmod);
        columns.push(Column {
            is_key: key,
            name: name.into(),
            type_oid: oid,
            type_modifier: typmod,
        });
    }
    out.push(b.seed(
        "relation",
        Message::Relation(Relation {
            id: 16384,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns,
        }),
    ));

    let mut b = Builder::new(b'Y');
    b.u32(90001).cstr("public").cstr("mood");
    out.push(b.seed(
        "type",
        Message::Type {
            id: 90001,
            namespace: "public".into(),
            name: "mood".into(),
        },
    ));

    let mut b = Builder::new(b'I');
    b.u32(16384).u8(b'N');
    let new = b.tuple(&[C::T(b"1"), C::N, C::T("é✓".as_bytes())]);
    out.push(b.seed("insert", Message::Insert { rel: 16384, new }));

    let mut b = Builder::new(b'I');
    b.u32(16385).u8(b'N');
    let new = b.tuple(&[C::B(b"\0\0\0\x2a"), C::T(b"")]);
    out.push(b.seed("insert_binary", Message::Insert { rel: 16385, new }));

    let mut b = Builder::new(b'U');
    b.u32(16384).u8(b'N');
    let new = b.tuple(&[C::T(b"1"), C::U, C::T(b"12.50")]);
    out.push(b.seed(
        "update",
        Message::Update {
            rel: 16384,
            old: None,
            new,
        },
    ));

    for (name, marker, old_cols, new_cols) in [
        (
            "update_key",
            b'K',
            [C::T(b"1"), C::N, C::N],
            [C::T(b"2"), C::U, C::T(b"3")],
        ),
        (
            "update_old",
            b'O',
            [C::T(b"1"), C::T(b"x"), C::N],
            [C::T(b"1"), C::T(b"y"), C::N],
        ),
    ] {
        let mut b = Builder::new(b'U');
        b.u32(16384).u8(marker);
        let old = b.tuple(&old_cols);
        b.u8(b'N');
        let new = b.tuple(&new_cols);
        out.push(b.seed(
            name,
            Message::Update {
                rel: 16384,
                old: Some(old),
                new,
            },
        ));
    }

    for (name, marker, cols) in [
        ("delete_key", b'K', [C::T(b"42"), C::N, C::N]),
        ("delete_old", b'O', [C::T(b"42"), C::T(b"gone"), C::T(b"0")]),
    ] {
        let mut b = Builder::new(b'D');
        b.u32(16384).u8(marker);
        let old = b.tuple(&cols);
        out.push(b.seed(name, Message::Delete { rel: 16384, old }));
    }

    let mut b = Builder::new(b'T');
    b.count(Field::Count32, 3)
        .u8(3)
        .u32(16384)
        .u32(16385)
        .u32(16386);
    out.push(b.seed(
        "truncate",
        Message::Truncate {
            rels: vec![16384, 16385, 16386],
            cascade: true,
            restart_identity: true,
        },
    ));

    let mut b = Builder::new(b'M');
    b.u8(1)
        .u64(0x16B_3748)
        .cstr("philotes")
        .count(Field::Count32, 5)
        .put(b"hello");
    out.push(b.seed(
        "message",
        Message::LogicalMessage {
            prefix: "philotes".into(),
            content: Bytes::from_static(b"hello"),
        },
    ));

    out
}

// ---- the checks every input goes through ----

/// Prints the input when a check or the decoder panics, so a failure can be reproduced.
struct Report<'a>(&'a [u8]);

impl Drop for Report<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("input ({} bytes): {:02x?}", self.0.len(), self.0);
        }
    }
}

fn check_tuple(t: &[Value], len: usize, consumed: &mut usize) {
    assert!(
        t.len() <= len,
        "tuple of {} values from {len} bytes",
        t.len()
    );
    for v in t {
        *consumed += 1;
        if let Value::Text(b) | Value::Binary(b) = v {
            *consumed += 4 + b.len();
        }
    }
}

/// A decoded message claims no more than its `len` input bytes hold.
fn check_message(m: &Message, len: usize) {
    let mut consumed = 1;
    match m {
        Message::Begin { .. } => consumed += 20,
        Message::Commit { .. } => consumed += 25,
        Message::Origin => {}
        Message::Type {
            namespace, name, ..
        } => consumed += 4 + namespace.len() + 1 + name.len() + 1,
        Message::Relation(r) => {
            assert!(r.columns.capacity() * size_of::<Column>() <= allocation_bound(len));
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

type Parsed = Result<Option<(ChangeKind, u32)>, DecodeError>;

/// Feeds `data` to `decode` and `parse_change`, checks what they return against each other and the
/// input, and returns both results.
fn check(data: &[u8]) -> (Result<Message, DecodeError>, Parsed) {
    let _report = Report(data);
    let len = data.len();
    let input = Bytes::copy_from_slice(data);

    let (decoded, largest) = largest_allocation(|| decode(input.clone()));
    assert!(
        largest <= allocation_bound(len),
        "decode allocated {largest} bytes at once for a {len}-byte input: {decoded:?}"
    );
    if let Ok(m) = &decoded {
        check_message(m, len);
    }

    let (mut old, mut new) = (Vec::new(), Vec::new());
    let (parsed, largest) = largest_allocation(|| parse_change(data, &mut old, &mut new));
    assert!(
        largest <= allocation_bound(len),
        "parse_change allocated {largest} bytes at once for a {len}-byte input: {parsed:?}"
    );
    for c in old.iter().chain(&new) {
        if c.is_value() {
            // In bounds of the message (this slices, so an out-of-range column panics).
            let _ = c.bytes(data);
        }
    }

    match (&parsed, &decoded) {
        (Err(_), _) if data.is_empty() => assert!(decoded.is_err()),
        (Ok(None), _) => assert!(!matches!(data[0], b'I' | b'U' | b'D')),
        (Err(_), Err(_)) => {}
        (Ok(Some((ChangeKind::Insert, rel))), Ok(Message::Insert { rel: r, new: n })) => {
            assert_eq!(rel, r);
            assert!(same_tuple(&new, n, data), "{new:?} vs {n:?}");
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
                assert!(same_tuple(&old, o, data), "{old:?} vs {o:?}");
            }
            assert!(same_tuple(&new, n, data), "{new:?} vs {n:?}");
        }
        (Ok(Some((ChangeKind::Delete, rel))), Ok(Message::Delete { rel: r, old: o })) => {
            assert_eq!(rel, r);
            assert!(same_tuple(&old, o, data), "{old:?} vs {o:?}");
        }
        (p, d) => panic!("parse_change and decode disagree: {p:?} vs {d:?}"),
    }
    (decoded, parsed)
}

fn is_change(data: &[u8]) -> bool {
    matches!(data.first(), Some(b'I' | b'U' | b'D'))
}

// ---- the tests ----

#[test]
fn every_seed_decodes_to_what_was_encoded() {
    let seeds = seeds();
    assert_eq!(seeds.len(), 14);
    for s in &seeds {
        let (decoded, parsed) = check(&s.bytes);
        assert_eq!(decoded.as_ref(), Ok(&s.expected), "{}", s.name);
        let want = match &s.expected {
            Message::Insert { rel, .. } => Some((ChangeKind::Insert, *rel)),
            Message::Update { rel, old, .. } => Some((
                ChangeKind::Update {
                    has_old: old.is_some(),
                },
                *rel,
            )),
            Message::Delete { rel, .. } => Some((ChangeKind::Delete, *rel)),
            _ => None,
        };
        assert_eq!(parsed, Ok(want), "{}", s.name);
    }
}

#[test]
fn every_truncation_of_a_valid_message_is_an_error() {
    let mut checked = 0;
    for s in seeds() {
        for cut in 0..s.bytes.len() {
            let prefix = &s.bytes[..cut];
            let (decoded, parsed) = check(prefix);
            if s.name == "origin" && cut > 0 {
                // decode reads only the type byte of an Origin message (its fields are unused).
                assert_eq!(decoded, Ok(Message::Origin));
                continue;
            }
            assert!(
                decoded.is_err(),
                "{} cut to {cut} bytes: {decoded:?}",
                s.name
            );
            if is_change(&s.bytes) || cut == 0 {
                assert!(parsed.is_err(), "{} cut to {cut}: {parsed:?}", s.name);
            } else {
                assert_eq!(parsed, Ok(None), "{} cut to {cut}", s.name);
            }
            checked += 1;
        }
    }
    assert!(checked > 300, "{checked}");
}

#[test]
fn a_count_or_length_beyond_the_message_is_an_error() {
    let mut checked = 0;
    for s in seeds() {
        for &(at, field) in &s.counts {
            let width = if field == Field::Count16 { 2 } else { 4 };
            let huge: &[u32] = match field {
                Field::Count16 => &[0x7fff, 0x4000, 0x0100],
                Field::Len32 => &[0x7fff_ffff, 0x0001_0000, 0x100],
                Field::Count32 => &[0xffff_ffff, 0x8000_0000, 0x7fff_ffff, 0x100],
            };
            for &v in huge {
                let mut m = s.bytes.clone();
                let be = v.to_be_bytes();
                m[at..at + width].copy_from_slice(&be[4 - width..]);
                let (decoded, parsed) = check(&m);
                assert!(
                    decoded.is_err(),
                    "{} with {v:#x} at {at}: {decoded:?}",
                    s.name
                );
                if is_change(&m) {
                    assert!(parsed.is_err(), "{} with {v:#x} at {at}", s.name);
                }
                checked += 1;
            }
            // Negative counts and lengths, and zero: whatever they decode to, no panic.
            for v in [0xffff_ffffu32, 0x8000_0000, 0xffff, 0x8000, 0] {
                let mut m = s.bytes.clone();
                let be = v.to_be_bytes();
                m[at..at + width].copy_from_slice(&be[4 - width..]);
                let _ = check(&m);
            }
        }
    }
    assert!(checked >= 80, "{checked}");
}

const RANDOM: usize = 300_000;
const MUTATED: usize = 800_000;

#[test]
fn random_bytes() {
    let tags = b"BCORYIUDTMZ\0";
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut buf = Vec::with_capacity(96);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..RANDOM {
        buf.clear();
        let len = rng.below(96);
        buf.extend((0..len).map(|_| rng.byte()));
        // Most get a real message type, or nearly all would stop at the first byte.
        if len > 0 && rng.below(8) != 0 {
            buf[0] = tags[rng.below(tags.len())];
        }
        match check(&buf).0 {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert_eq!(ok + err, RANDOM);
    assert!(ok > 1000 && err > 1000, "ok {ok}, err {err}");
}

/// Changes `m` in one of a dozen ways.
fn mutate(rng: &mut Rng, m: &mut Vec<u8>, seed: &Seed, other: &Seed) {
    const INTERESTING: [u8; 12] = [
        0, 1, 0x7f, 0x80, 0xff, b'N', b'K', b'O', b'n', b'u', b't', b'b',
    ];
    if m.is_empty() {
        m.push(rng.byte());
        return;
    }
    let at = rng.below(m.len());
    match rng.below(12) {
        0 => m[at] ^= 1 << rng.below(8),
        1 => m[at] = rng.byte(),
        2 => m[at] = INTERESTING[rng.below(INTERESTING.len())],
        3 => m.truncate(at),
        4 => m.insert(at, rng.byte()),
        5 => {
            m.remove(at);
        }
        6 => {
            // Repeat a run of bytes.
            let end = (at + 1 + rng.below(8)).min(m.len());
            let run = m[at..end].to_vec();
            m.splice(at..at, run);
        }
        7 => {
            // Another message's tail.
            let from = rng.below(other.bytes.len());
            m.truncate(at);
            m.extend_from_slice(&other.bytes[from..]);
        }
        8 => m.push(rng.byte()),
        _ => {
            // A count or length of the seed (if still in place) set to an extreme.
            let Some(&(pos, field)) = seed.counts.get(rng.below(seed.counts.len().max(1))) else {
                m[at] = 0xff;
                return;
            };
            let width = if field == Field::Count16 { 2 } else { 4 };
            const EXTREMES: [u32; 8] = [
                0x7fff_ffff,
                0xffff_ffff,
                0x8000_0000,
                0x7fff,
                0xffff,
                0x8000,
                0,
                1,
            ];
            let be = EXTREMES[rng.below(EXTREMES.len())].to_be_bytes();
            if pos + width <= m.len() {
                m[pos..pos + width].copy_from_slice(&be[4 - width..]);
            }
        }
    }
}

#[test]
fn mutated_messages() {
    let seeds = seeds();
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut per_seed = vec![(0usize, 0usize); seeds.len()];
    let mut m = Vec::new();
    for _ in 0..MUTATED {
        let i = rng.below(seeds.len());
        let (seed, other) = (&seeds[i], &seeds[rng.below(seeds.len())]);
        m.clear();
        m.extend_from_slice(&seed.bytes);
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut m, seed, other);
        }
        match check(&m).0 {
            Ok(_) => per_seed[i].0 += 1,
            Err(_) => per_seed[i].1 += 1,
        }
    }
    assert_eq!(per_seed.iter().map(|(o, e)| o + e).sum::<usize>(), MUTATED);
    // The mutations neither all break nor all spare a message of any kind.
    for (s, (ok, err)) in seeds.iter().zip(&per_seed) {
        assert!(*ok > 100 && *err > 100, "{}: ok {ok}, err {err}", s.name);
    }
}

//! Decoder for the pgoutput logical replication protocol (version 1). Values stay slices of the
//! received buffer (`Bytes`), so decoding copies no column data.

use bytes::{Buf, Bytes};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("unknown pgoutput message type {0:?}")]
    UnknownMessage(char),
    #[error("unexpected tuple marker {0:?}")]
    UnexpectedMarker(char),
    #[error("unknown column kind {0:?}")]
    UnknownColumnKind(char),
    #[error("string in pgoutput message is not UTF-8")]
    NotUtf8,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value: the column keeps the value it had; it is not sent.
    UnchangedToast,
    /// The text output of the type.
    Text(Bytes),
    /// The binary send format (only when binary mode was asked for).
    Binary(Bytes),
}

pub type Tuple = Vec<Value>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the primary key for default identity).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Origin,
    Relation(Relation),
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        rel: u32,
        new: Tuple,
    },
    Update {
        rel: u32,
        /// The old key ('K') or the whole old row ('O'), sent when the key changed or identity is FULL.
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        rel: u32,
        old: Tuple,
    },
    Truncate {
        rels: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    LogicalMessage {
        prefix: String,
        content: Bytes,
    },
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_i16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = self.buf.split_to(end);
        self.buf.advance(1);
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError::NotUtf8)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("tuple column count")?.max(0) as usize;
        // Untrusted count: reserve no more columns than bytes are left (each takes one or more).
        let mut values = Vec::with_capacity(n.min(self.buf.remaining()));
        for _ in 0..n {
            let kind = self.u8("column kind")?;
            values.push(match kind {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' | b'b' => {
                    let len = self.i32("column length")?.max(0) as usize;
                    let data = self.bytes(len, "column value")?;
                    if kind == b't' {
                        Value::Text(data)
                    } else {
                        Value::Binary(data)
                    }
                }
                other => return Err(DecodeError::UnknownColumnKind(other as char)),
            });
        }
        Ok(values)
    }
}

/// One column of a tuple, as a range of the message it came from (nothing is copied): `kind` is `n`
/// (NULL), `u` (unchanged TOAST), `t` (text) or `b` (binary); `start..start + len` holds the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Col {
    pub kind: u8,
    pub start: u32,
    pub len: u32,
}

impl Col {
    pub fn is_value(&self) -> bool {
        matches!(self.kind, b't' | b'b')
    }

    pub fn bytes<'a>(&self, msg: &'a [u8]) -> &'a [u8] {
        &msg[self.start as usize..(self.start + self.len) as usize]
    }
}

/// A row change read in place by [`parse_change`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Insert,
    /// `old` holds the old key ('K') or old row ('O') when it was sent.
    Update {
        has_old: bool,
    },
    Delete,
}

fn tuple_cols(buf: &[u8], pos: &mut usize, out: &mut Vec<Col>) -> Result<(), DecodeError> {
    out.clear();
    let take = |pos: &mut usize, n: usize, what: &'static str| -> Result<usize, DecodeError> {
        let at = *pos;
        if buf.len() < at + n {
            return Err(DecodeError::Truncated(what));
        }
        *pos += n;
        Ok(at)
    };
    let at = take(pos, 2, "tuple column count")?;
    let n = i16::from_be_bytes([buf[at], buf[at + 1]]).max(0) as usize;
    // Untrusted count: reserve no more columns than bytes are left (each takes one or more).
    out.reserve(n.min(buf.len() - *pos));
    for _ in 0..n {
        let kind = buf[take(pos, 1, "column kind")?];
        match kind {
            b'n' | b'u' => out.push(Col {
                kind,
                start: 0,
                len: 0,
            }),
            b't' | b'b' => {
                let at = take(pos, 4, "column length")?;
                let len = i32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
                    .max(0) as usize;
                let start = take(pos, len, "column value")?;
                out.push(Col {
                    kind,
                    start: start as u32,
                    len: len as u32,
                });
            }
            other => return Err(DecodeError::UnknownColumnKind(other as char)),
        }
    }
    Ok(())
}

/// Reads an Insert, Update or Delete message without copying or allocating (the column vectors are
/// reused): the relation id and the tuples as ranges of `buf`. Delete's key or old row goes to `old`.
/// Returns None for every other message type (use [`decode`] for those).
pub fn parse_change(
    buf: &[u8],
    old: &mut Vec<Col>,
    new: &mut Vec<Col>,
) -> Result<Option<(ChangeKind, u32)>, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Truncated("message type"));
    };
    if !matches!(tag, b'I' | b'U' | b'D') {
        return Ok(None);
    }
    if buf.len() < 6 {
        return Err(DecodeError::Truncated(match tag {
            b'I' => "insert relation",
            b'U' => "update relation",
            _ => "delete relation",
        }));
    }
    let rel = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let mut pos = 6;
    let marker = buf[5];
    Ok(Some(match tag {
        b'I' => {
            if marker != b'N' {
                return Err(DecodeError::UnexpectedMarker(marker as char));
            }
            tuple_cols(buf, &mut pos, new)?;
            (ChangeKind::Insert, rel)
        }
        b'U' => {
            let mut marker = marker;
            let mut has_old = false;
            if marker == b'K' || marker == b'O' {
                tuple_cols(buf, &mut pos, old)?;
                has_old = true;
                marker = *buf
                    .get(pos)
                    .ok_or(DecodeError::Truncated("update new marker"))?;
                pos += 1;
            }
            if marker != b'N' {
                return Err(DecodeError::UnexpectedMarker(marker as char));
            }
            tuple_cols(buf, &mut pos, new)?;
            (ChangeKind::Update { has_old }, rel)
        }
        _ => {
            if marker != b'K' && marker != b'O' {
                return Err(DecodeError::UnexpectedMarker(marker as char));
            }
            tuple_cols(buf, &mut pos, old)?;
            (ChangeKind::Delete, rel)
        }
    }))
}

/// Decodes one pgoutput message (the payload of an XLogData message).
pub fn decode(buf: Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader { buf };
    let tag = r.u8("message type")?;
    Ok(match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("begin final lsn")?,
            commit_time: r.i64("begin time")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => {
            r.u8("commit flags")?;
            Message::Commit {
                commit_lsn: r.u64("commit lsn")?,
                end_lsn: r.u64("commit end lsn")?,
                commit_time: r.i64("commit time")?,
            }
        }
        b'O' => Message::Origin,
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.cstr("relation namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("relation column count")?.max(0) as usize;
            // Untrusted, as in a tuple: no more columns than bytes are left.
            let mut columns = Vec::with_capacity(n.min(r.buf.remaining()));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(Column {
                    is_key: flags & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            id: r.u32("type id")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let rel = r.u32("insert relation")?;
            match r.u8("insert marker")? {
                b'N' => Message::Insert {
                    rel,
                    new: r.tuple()?,
                },
                m => return Err(DecodeError::UnexpectedMarker(m as char)),
            }
        }
        b'U' => {
            let rel = r.u32("update relation")?;
            let mut marker = r.u8("update marker")?;
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                old = Some(r.tuple()?);
                marker = r.u8("update new marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::UnexpectedMarker(marker as char));
            }
            Message::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32("delete relation")?;
            match r.u8("delete marker")? {
                b'K' | b'O' => Message::Delete {
                    rel,
                    old: r.tuple()?,
                },
                m => return Err(DecodeError::UnexpectedMarker(m as char)),
            }
        }
        b'T' => {
            let n = r.u32("truncate relation count")? as usize;
            let options = r.u8("truncate options")?;
            let mut rels = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                rels.push(r.u32("truncate relation")?);
            }
            Message::Truncate {
                rels,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'M' => {
            r.u8("message flags")?;
            r.u64("message lsn")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.u32("message length")? as usize;
            Message::LogicalMessage {
                prefix,
                content: r.bytes(len, "message content")?,
            }
        }
        other => return Err(DecodeError::UnknownMessage(other as char)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The system allocator, noting each thread's largest single allocation (for this crate's unit
    /// tests only: it changes nothing else).
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

    /// What `f` returned, and the largest single allocation it made.
    fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LARGEST.with(|l| l.set(0));
        let out = f();
        (out, LARGEST.with(|l| l.get()))
    }

    #[test]
    fn a_column_count_larger_than_the_message_reserves_nothing_for_it() {
        // Found by the fuzzer (fuzz/): an Insert whose tuple claims 0x4e00 = 19,968 columns and
        // holds none. decode reserved 19,968 values (780 KiB) and parse_change 19,968 columns
        // (234 KiB) for these 8 bytes before finding them too short.
        let input = [b'I', 0, 0, 1, 0, b'N', 0x4e, 0];
        let (res, largest) = largest_allocation(|| decode(Bytes::copy_from_slice(&input)));
        assert_eq!(res, Err(DecodeError::Truncated("column kind")));
        assert!(largest <= 64, "decode allocated {largest} bytes at once");
        let (mut old, mut new) = (Vec::new(), Vec::new());
        let (res, largest) = largest_allocation(|| parse_change(&input, &mut old, &mut new));
        assert_eq!(res, Err(DecodeError::Truncated("column kind")));
        assert!(
            largest <= 64,
            "parse_change allocated {largest} bytes at once"
        );

        // The same for a relation's columns: 0x7fff claimed, none there.
        let input = b"R\0\0\x40\0public\0orders\0d\x7f\xff";
        let (res, largest) = largest_allocation(|| decode(Bytes::from_static(input)));
        assert_eq!(res, Err(DecodeError::Truncated("column flags")));
        assert!(largest <= 64, "decode allocated {largest} bytes at once");
    }

    fn tuple(b: &mut BytesMut, vals: &[Option<&str>], unchanged: &[usize]) {
        b.put_i16(vals.len() as i16);
        for (i, v) in vals.iter().enumerate() {
            if unchanged.contains(&i) {
                b.put_u8(b'u');
            } else if let Some(s) = v {
                b.put_u8(b't');
                b.put_i32(s.len() as i32);
                b.put_slice(s.as_bytes());
            } else {
                b.put_u8(b'n');
            }
        }
    }

    #[test]
    fn relation_and_changes() {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(16384);
        b.put_slice(b"public\0orders\0");
        b.put_u8(b'd');
        b.put_i16(2);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(20);
        b.put_i32(-1);
        b.put_u8(0);
        b.put_slice(b"note\0");
        b.put_u32(25);
        b.put_i32(-1);
        let m = decode(b.freeze()).unwrap();
        let Message::Relation(rel) = m else {
            panic!("not a relation: {m:?}")
        };
        assert_eq!(rel.namespace, "public");
        assert_eq!(rel.name, "orders");
        assert!(rel.columns[0].is_key && !rel.columns[1].is_key);
        assert_eq!(rel.columns[1].type_oid, 25);

        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(16384);
        b.put_u8(b'K');
        tuple(&mut b, &[Some("1"), None], &[]);
        b.put_u8(b'N');
        tuple(&mut b, &[Some("2"), None], &[1]);
        assert_eq!(
            decode(b.freeze()).unwrap(),
            Message::Update {
                rel: 16384,
                old: Some(vec![Value::Text(Bytes::from_static(b"1")), Value::Null]),
                new: vec![Value::Text(Bytes::from_static(b"2")), Value::UnchangedToast],
            }
        );

        let mut b = BytesMut::new();
        b.put_u8(b'T');
        b.put_u32(2);
        b.put_u8(3);
        b.put_u32(1);
        b.put_u32(2);
        assert_eq!(
            decode(b.freeze()).unwrap(),
            Message::Truncate {
                rels: vec![1, 2],
                cascade: true,
                restart_identity: true
            }
        );
    }

    #[test]
    fn parse_change_reads_in_place_like_decode() {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(16384);
        b.put_u8(b'K');
        tuple(&mut b, &[Some("1"), None], &[]);
        b.put_u8(b'N');
        tuple(&mut b, &[Some("2"), None, Some("é✓")], &[1]);
        let msg = b.freeze();
        let (mut old, mut new) = (Vec::new(), Vec::new());
        let (kind, rel) = parse_change(&msg, &mut old, &mut new).unwrap().unwrap();
        assert_eq!((kind, rel), (ChangeKind::Update { has_old: true }, 16384));
        assert_eq!(old.len(), 2);
        assert_eq!(old[0].bytes(&msg), b"1");
        assert_eq!(old[1].kind, b'n');
        assert_eq!(new[0].bytes(&msg), b"2");
        assert_eq!(new[1].kind, b'u');
        assert_eq!(new[2].bytes(&msg), "é✓".as_bytes());

        let mut b = BytesMut::new();
        b.put_u8(b'D');
        b.put_u32(7);
        b.put_u8(b'K');
        tuple(&mut b, &[Some("42")], &[]);
        let msg = b.freeze();
        let (kind, rel) = parse_change(&msg, &mut old, &mut new).unwrap().unwrap();
        assert_eq!((kind, rel), (ChangeKind::Delete, 7));
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].bytes(&msg), b"42");

        assert_eq!(parse_change(b"B", &mut old, &mut new), Ok(None));
        assert_eq!(
            parse_change(b"I\0\0", &mut old, &mut new),
            Err(DecodeError::Truncated("insert relation"))
        );
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(10);
        b.put_slice(b"abc");
        assert_eq!(
            parse_change(&b.freeze(), &mut old, &mut new),
            Err(DecodeError::Truncated("column value"))
        );
    }

    #[test]
    fn truncated_and_unknown_input_is_an_error_not_a_panic() {
        assert_eq!(
            decode(Bytes::from_static(b"I\0\0")),
            Err(DecodeError::Truncated("insert relation"))
        );
        assert_eq!(
            decode(Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownMessage('Z'))
        );
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(10);
        b.put_slice(b"abc");
        assert_eq!(
            decode(b.freeze()),
            Err(DecodeError::Truncated("column value"))
        );
    }
}

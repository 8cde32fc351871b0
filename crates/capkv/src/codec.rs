//! The storage codec: how every record capkv keeps (Raft log entries, vote, snapshots,
//! idempotency records, ap objects, hints) is encoded, and which formats it reads. Below
//! `cp/` and `ap/`, which both store records.

use serde::Serialize;

/// The format of every record [`encode`] writes: Raft log entries, vote, snapshots,
/// idempotency records, ap objects, hints and the reap floor. bincode has no schema, so
/// a changed type would silently misread old records; each record starts with
/// [`MAGIC`] and this byte instead, and a binary meeting a format it does not know
/// refuses it by name. Raise it whenever a stored type changes shape (and decode the
/// older format alongside).
///
/// - 1: the first.
/// - 2: an ap register's context names exact dots beside its version vector
///   (`ap::dvv::Context`). Format-1 records are still read: only `ApState` changed shape,
///   and it is read through its format-1 layout; every other type is unchanged.
pub const FORMAT: u8 = 2;
/// First byte of every record, so records from before formats existed are told apart.
pub const MAGIC: u8 = 0xCA;

/// Serializes a value that is part of our own storage format: [`MAGIC`], [`FORMAT`],
/// then bincode.
/// The length [`encode`] would give, without encoding (no allocation).
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    2 + bincode::serialized_size(value).expect("bincode serialization of our own types cannot fail")
        as usize
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![MAGIC, FORMAT];
    bincode::serialize_into(&mut out, value)
        .expect("bincode serialization of our own types cannot fail");
    out
}

/// A type kept in storage, read by [`decode`]. Every stored type says how a format-1
/// record of it reads: by default the same bytes as format 2; `ap::value::ApState`, the one
/// type whose shape changed, reads its format-1 layout and converts it.
pub trait Stored: serde::de::DeserializeOwned {
    fn from_format_1(body: &[u8]) -> Result<Self, bincode::Error> {
        bincode::deserialize(body)
    }
}

/// Reads a record written by [`encode`], in this format or format 1.
pub fn decode<T: Stored>(bytes: &[u8]) -> Result<T, bincode::Error> {
    let refuse = |why: String| Err(Box::new(bincode::ErrorKind::Custom(why)));
    match bytes {
        [MAGIC, FORMAT, body @ ..] => bincode::deserialize(body),
        [MAGIC, 1, body @ ..] => T::from_format_1(body),
        [MAGIC, other, ..] => refuse(format!(
            "record in storage format {other}, but this capkv reads formats 1 to {FORMAT} \
             (a data directory from a newer capkv?)"
        )),
        _ => refuse(
            "record without a storage format header (a data directory from a capkv before \
             format 1?)"
                .to_owned(),
        ),
    }
}

macro_rules! stored {
    ($($t:ty),* $(,)?) => { $(impl Stored for $t {})* };
}

stored!(bool, u64, String, Vec<u8>);
impl<T: Stored> Stored for Option<T> {}
impl<A: Stored, B: Stored> Stored for (A, B) {}
impl<A: Stored, B: Stored, C: Stored> Stored for (A, B, C) {}

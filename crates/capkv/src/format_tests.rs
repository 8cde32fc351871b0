//! Golden bytes of the stored types at storage format [`FORMAT`](crate::cp::FORMAT).
//!
//! bincode has no schema: a field added, removed or reordered in a stored type (or a
//! dependency that serializes differently after an upgrade) silently changes the bytes,
//! and records written before would be misread. If this test fails, the encoding
//! changed: raise `cp::FORMAT`, keep decoding the previous format, and only then update
//! the bytes below.

use capkv_core::{KeyspaceSpec, Mode, ValueType};

use crate::ap::dvv::{Context, Dot, Object};
use crate::ap::value::{ApState, Hlc, LwwValue, Mutation, ReapFloor};
use crate::cp::{decode, encode, Batch, Command, Condition, Op, TypeConfig, MAGIC};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One sample of every stored type, built the same way every time.
fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let batch = Batch(vec![
        Command {
            op: Op::Put {
                keyspace: "bank".into(),
                key: b"alice".to_vec(),
                value: b"100".to_vec(),
                condition: Some(Condition::Version(3)),
            },
            idempotency_key: Some("pay-7".into()),
            proposed_at_ms: 1_700_000_000_000,
        },
        Command {
            op: Op::Delete {
                keyspace: "bank".into(),
                key: b"bob".to_vec(),
                condition: Some(Condition::Value(b"5".to_vec())),
            },
            idempotency_key: None,
            proposed_at_ms: 1_700_000_000_001,
        },
        Command {
            op: Op::CreateKeyspace {
                spec: KeyspaceSpec {
                    name: "stock".into(),
                    mode: Mode::Ap,
                    n: Some(3),
                    r: Some(1),
                    w: Some(2),
                    value_type: Some(ValueType::Counter),
                },
            },
            idempotency_key: None,
            proposed_at_ms: 1_700_000_000_002,
        },
    ]);
    let entry = openraft::Entry::<TypeConfig> {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), 7),
        payload: openraft::EntryPayload::Normal(batch),
    };
    let write = |v: Option<&str>| Mutation::Write {
        context: Context::default(),
        value: v.map(|v| v.as_bytes().to_vec()),
    };
    let (register, _) = Object::default()
        .update(
            &Context::default(),
            "n1.0a0b0c0d",
            Some(b"book".to_vec()),
            1_700_000_000_000,
        )
        .expect("a first dot");
    let register = ApState::Register(register)
        .apply(&write(None), "n2.01020304", 1_700_000_000_005)
        .unwrap();
    let lww = ApState::Lww(Some(LwwValue {
        stamp: Hlc {
            wall_ms: 1_700_000_000_000,
            logical: 2,
        },
        actor: "n3.0f0e0d0c".into(),
        value: Some(b"v".to_vec()),
    }));
    let counter = ApState::empty(ValueType::Counter)
        .apply(&Mutation::Add { by: -4 }, "n1.0a0b0c0d", 0)
        .unwrap();
    // One member only: the set's entries are a hash map, whose order is not fixed.
    let set = ApState::empty(ValueType::Set)
        .apply(
            &Mutation::Insert {
                members: vec!["apple".into()],
            },
            "n1.0a0b0c0d",
            0,
        )
        .unwrap();
    let floor = ReapFloor {
        dot: 5,
        stamp: Some(Hlc {
            wall_ms: 1_700_000_000_000,
            logical: 1,
        }),
    };
    // A register whose context names an exact dot: a write at n2 with the context a write
    // at n1 returned, where n1 had issued (n1, 1) to someone else before.
    let seen_by_client = Context::default().after_write(&Dot {
        actor: "n1.0a0b0c0d".into(),
        counter: 2,
    });
    let exact = ApState::empty(ValueType::Register)
        .apply(
            &Mutation::Write {
                context: seen_by_client,
                value: Some(b"pen".to_vec()),
            },
            "n2.01020304",
            1_700_000_000_009,
        )
        .unwrap();
    vec![
        ("Raft log entry", encode(&entry)),
        ("ap register with a tombstone sibling", encode(&register)),
        ("ap lww", encode(&lww)),
        ("ap counter", encode(&counter)),
        ("ap set", encode(&set)),
        ("reap floor", encode(&floor)),
        (
            "ap register with an exact dot in its context",
            encode(&exact),
        ),
    ]
}

/// The same samples as storage format 1 wrote them (before contexts named exact dots).
const FORMAT_1: [&str; 6] = [
    concat!(
        "ca010200000000000000010000000000000007000000000000000100000003000000000000000000",
        "0000040000000000000062616e6b0500000000000000616c69636503000000000000003130300100",
        "00000003000000000000000105000000000000007061792d370068e5cf8b01000001000000040000",
        "000000000062616e6b0300000000000000626f620101000000010000000000000035000168e5cf8b",
        "01000002000000050000000000000073746f636b0100000001030000000101000000010200000001",
        "01000000000268e5cf8b010000",
    ),
    concat!(
        "ca010000000002000000000000000b000000000000006e312e306130623063306401000000000000",
        "00010400000000000000626f6f6b0068e5cf8b0100000b000000000000006e322e30313032303330",
        "340100000000000000000568e5cf8b01000002000000000000000b000000000000006e312e306130",
        "623063306401000000000000000b000000000000006e322e30313032303330340100000000000000",
    ),
    concat!(
        "ca0101000000010068e5cf8b010000020000000b000000000000006e332e30663065306430630101",
        "0000000000000076",
    ),
    concat!(
        "ca0102000000000000000000000001000000000000000b000000000000006e312e30613062306330",
        "640400000000000000",
    ),
    concat!(
        "ca010300000001000000000000000b000000000000006e312e306130623063306401000000000000",
        "00010000000000000005000000000000006170706c6501000000000000000b000000000000006e31",
        "2e306130623063306401000000000000000000000000000000",
    ),
    "ca010500000000000000010068e5cf8b01000001000000",
];

#[test]
fn stored_types_keep_their_bytes() {
    let golden: [&str; 7] = [
        concat!(
            "ca020200000000000000010000000000000007000000000000000100000003000000000000000000",
            "0000040000000000000062616e6b0500000000000000616c69636503000000000000003130300100",
            "00000003000000000000000105000000000000007061792d370068e5cf8b01000001000000040000",
            "000000000062616e6b0300000000000000626f620101000000010000000000000035000168e5cf8b",
            "01000002000000050000000000000073746f636b0100000001030000000101000000010200000001",
            "01000000000268e5cf8b010000",
        ),
        concat!(
            "ca020000000002000000000000000b000000000000006e312e306130623063306401000000000000",
            "00010400000000000000626f6f6b0068e5cf8b0100000b000000000000006e322e30313032303330",
            "340100000000000000000568e5cf8b01000002000000000000000b000000000000006e312e306130",
            "623063306401000000000000000b000000000000006e322e30313032303330340100000000000000",
            "0000000000000000",
        ),
        concat!(
            "ca0201000000010068e5cf8b010000020000000b000000000000006e332e30663065306430630101",
            "0000000000000076",
        ),
        concat!(
            "ca0202000000000000000000000001000000000000000b000000000000006e312e30613062306330",
            "640400000000000000",
        ),
        concat!(
            "ca020300000001000000000000000b000000000000006e312e306130623063306401000000000000",
            "00010000000000000005000000000000006170706c6501000000000000000b000000000000006e31",
            "2e306130623063306401000000000000000000000000000000",
        ),
        "ca020500000000000000010068e5cf8b01000001000000",
        concat!(
            "ca020000000001000000000000000b000000000000006e322e303130323033303401000000000000",
            "0001030000000000000070656e0968e5cf8b01000001000000000000000b000000000000006e322e",
            "3031303230333034010000000000000001000000000000000b000000000000006e312e3061306230",
            "6330640200000000000000",
        ),
    ];
    for ((what, bytes), want) in samples().iter().zip(golden) {
        assert_eq!(
            hex(bytes),
            want,
            "the stored encoding of {what} changed: raise cp::FORMAT (see this module's doc)"
        );
    }
}

/// Records written by format 1 read back as the same values (only an ap register's
/// context changed shape; it reads as a context without exact dots).
#[test]
fn format_1_records_still_read() {
    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }
    let now = samples();
    for (i, old) in FORMAT_1.iter().enumerate() {
        let raw = unhex(old);
        assert_eq!(raw[..2], [MAGIC, 1]);
        let again = match i {
            0 => encode(&decode::<openraft::Entry<TypeConfig>>(&raw).unwrap()),
            5 => encode(&decode::<ReapFloor>(&raw).unwrap()),
            _ => encode(&decode::<ApState>(&raw).unwrap()),
        };
        assert_eq!(hex(&again), hex(&now[i].1), "{}", now[i].0);
    }
}

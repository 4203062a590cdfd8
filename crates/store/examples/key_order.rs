//! What a commit of new replicated records costs redb, by the order of the row keys: keyed
//! by record key (a random AOR: one page copied per record) or by seq (an append). Used by
//! bench/store_layout.sh; prints one line per layout.
//!
//! usage: key_order [EXISTING_ROWS] [BATCH] [COMMITS]

use std::time::Instant;

use causeway_store::{Op, RedbStore, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (existing, batch, commits) = (arg(1, 300_000), arg(2, 48), arg(3, 200));
    let dir = tempfile::tempdir()?;
    let value = vec![7u8; 300];
    for layout in ["by record key", "by seq"] {
        let store = RedbStore::open(&dir.path().join(format!("{}.redb", layout.len())))?;
        let key = |n: u64| -> Vec<u8> {
            let mut k = b"registrations\0peer1\0".to_vec();
            if layout == "by seq" {
                k.extend_from_slice(&n.to_be_bytes());
            } else {
                // An AOR: user names hash all over the key space.
                let user = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                k.extend_from_slice(
                    format!("u{user:016x}@example.com|sip:u{n}@192.0.2.1").as_bytes(),
                );
            }
            k
        };
        let rows = |from: u64, count: u64| -> Vec<Op> {
            (from..from + count)
                .map(|n| Op::Put {
                    table: "records",
                    key: key(n),
                    value: value.clone(),
                })
                .collect()
        };
        let mut n = 0;
        while n < existing {
            store.apply(&rows(n, 10_000))?;
            n += 10_000;
        }
        let started = Instant::now();
        for _ in 0..commits {
            store.apply(&rows(n, batch))?;
            n += batch;
        }
        let per_commit = started.elapsed().as_micros() as u64 / commits.max(1);
        println!(
            "layout=\"{layout}\" existing_rows={existing} batch={batch} commits={commits} us_per_commit={per_commit} us_per_record={}",
            per_commit / batch.max(1)
        );
    }
    Ok(())
}

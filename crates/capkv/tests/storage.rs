//! The storage engine across real crashes: a child process writes as hard as it can and
//! is killed with SIGKILL; the store must reopen and take writes again.
//!
//! #8 item 14: after a kill -9, fjall 2 recovered several sealed memtables but woke its
//! flusher once per partition, and each flush run took at most "flush workers" (the
//! machine's cores) memtables; the rest were never flushed, the write buffer stayed over
//! its limit, and every later write slept in fjall's write halt for ever. A node froze
//! that way in 5 of 8 kill-and-restart runs. `FjallEngine` now lets a run take enough
//! memtables that recovery flushes them all.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capkv::storage::{Engine, FjallEngine, Tree, WriteBatch};

const WRITER_DIR: &str = "CAPKV_TEST_WRITER_DIR";

/// Rewrites large objects (as ap sets are) and appends log entries, syncing now and
/// then, printing a line after every 64 writes.
fn write_forever(dir: &Path) -> ! {
    let e = FjallEngine::open(dir).unwrap();
    for i in 0u64.. {
        let mut b = WriteBatch::new();
        let size = 20_000 + (i % 64) as usize * 1000;
        b.put(
            Tree::Ap,
            format!("set{}", i % 64).into_bytes(),
            vec![i as u8; size],
        );
        b.put(Tree::Log, i.to_be_bytes().to_vec(), vec![7u8; 512]);
        e.write(b).unwrap();
        if i % 16 == 0 {
            e.sync().unwrap();
        }
        if i % 64 == 0 {
            println!("wrote {i}");
        }
    }
    unreachable!()
}

/// Not a test of its own: the writer the crash test starts (and kills) in a child process.
#[test]
#[ignore = "run by kill_9_during_heavy_writes_never_leaves_a_store_that_stops_writing"]
fn writer_child() {
    if let Ok(dir) = std::env::var(WRITER_DIR) {
        write_forever(Path::new(&dir));
    }
}

/// Runs the writer on the store in `dir/store` until it has written about `bytes`, then
/// kills it with SIGKILL.
fn write_then_kill(dir: &Path, bytes: u64) {
    let err_path = dir.join("writer.stderr");
    let err = std::fs::File::create(&err_path).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "writer_child", "--nocapture"])
        .env(WRITER_DIR, dir.join("store"))
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // About 50 KB a write on average; a line every 64 writes.
    let lines = bytes / (64 * 50_000);
    let mut seen = 0;
    while seen < lines {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(l)) if l.starts_with("wrote") => seen += 1,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the writer stopped writing before the kill ({e}): {}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn kill_9_during_heavy_writes_never_leaves_a_store_that_stops_writing() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..4 {
        // Well past fjall's 64 MiB write buffer, so memtables wait for flushing at the kill.
        write_then_kill(dir.path(), 150 << 20);
        let e = std::sync::Arc::new(FjallEngine::open(&dir.path().join("store")).unwrap());
        let (tx, rx) = mpsc::channel();
        let writer = e.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            for i in 0..2000u64 {
                let mut b = WriteBatch::new();
                b.put(
                    Tree::Ap,
                    format!("after{i}").into_bytes(),
                    vec![1u8; 40_000],
                );
                writer.write(b).unwrap();
            }
            let took = started.elapsed();
            drop(writer);
            let _ = tx.send(took);
        });
        // fjall may halt writers for some seconds while compaction catches up; a store
        // that recovered wrongly halts them for ever.
        let took = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("round {round}: writes after recovery never finished"));
        eprintln!("round {round}: 80 MB written after recovery in {took:?}");
        // Closed before the next writer opens the store.
        thread.join().unwrap();
        drop(e);
    }
}

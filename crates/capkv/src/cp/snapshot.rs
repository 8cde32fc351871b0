//! Streaming snapshots of the cp state machine (#9 item 1).
//!
//! A snapshot is a file, never a buffer: it is written from a frozen read view of the
//! data tree ([`Engine::read_view`]) while applies go on, sent by openraft in chunks of
//! [`CHUNK_BYTES`] read from the file, received into a file chunk by chunk, checked
//! whole, and installed by streaming it into the engine in bounded batches. Memory used
//! by a snapshot is a few buffers of about a MiB, whatever the size of the data.
//!
//! File layout (all integers big-endian):
//!
//! ```text
//!   "CAPKVSNP" version:u8 revision:u64          header
//!   ( key_len:u32 key value_len:u32 value )*    rows, keys strictly ascending
//!   0xFFFFFFFF rows:u64 xxh3:u64                end: row count, hash of all bytes before
//! ```
//!
//! Installing merges the file into the data tree in key order: keys absent from the
//! snapshot are deleted, keys whose value differs are written, equal keys are left
//! alone (a follower that is only a little behind rewrites little). A key is at every
//! moment either its old or its new value, never missing when both have it. The batches
//! are not atomic together, so the state machine records "installing this file" before
//! the first (fsynced) and clears it with the last; a node that crashes in between
//! installs the same file again when it restarts.
//!
//! [`Engine::read_view`]: crate::storage::Engine::read_view

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::rt::Instant;

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::storage::{Engine, ReadView, Tree, WriteBatch};

/// Bytes of snapshot file per InstallSnapshot message (openraft's chunk size).
pub const CHUNK_BYTES: u64 = 1 << 20;
/// Buffer of the file writer and reader.
const IO_BUFFER_BYTES: usize = 1 << 20;
/// A snapshot being written is synced every this many bytes (like RocksDB's
/// `bytes_per_sync`), so its writeback never comes as one burst.
const SYNC_EVERY_BYTES: u64 = 8 << 20;
/// The pace a snapshot is written at (a 4 GiB data set: about a minute). Snapshots are
/// taken once the log written since the last one is as large as it, so this keeps up
/// with any write rate below it.
const WRITE_BYTES_PER_SEC: u64 = 64 << 20;
/// An install writes a batch when it holds this many bytes or [`INSTALL_BATCH_OPS`] ops.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
const INSTALL_BATCH_OPS: usize = 4096;
/// A key or value longer than this in a snapshot file means the file is corrupt (no
/// honest writer makes one: values are bounded far below it).
const FIELD_BYTES_MAX: u32 = 256 << 20;

const MAGIC: &[u8; 8] = b"CAPKVSNP";
const VERSION: u8 = 1;
const END: u32 = u32::MAX;

/// What a snapshot file says about itself, checked from end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub revision: u64,
    pub rows: u64,
    pub bytes: u64,
}

fn corrupt(path: &Path, why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("snapshot file {}: {why}", path.display()),
    )
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: xxhash_rust::xxh3::Xxh3,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the rows of `view` (the data tree at one instant) to a new file at `path`,
/// fsynced. Blocking: run it off the async workers.
pub fn write(view: &dyn ReadView, revision: u64, path: &Path) -> std::io::Result<Summary> {
    let file = File::create(path)?;
    let mut w = Hashing {
        inner: BufWriter::with_capacity(IO_BUFFER_BYTES, file),
        hash: xxhash_rust::xxh3::Xxh3::new(),
        bytes: 0,
    };
    w.write_all(MAGIC)?;
    w.write_all(&[VERSION])?;
    w.write_all(&revision.to_be_bytes())?;
    let mut rows = 0u64;
    let mut synced = 0u64;
    let started = Instant::now();
    for row in view.iter_from(b"") {
        let (k, v) = row.map_err(std::io::Error::other)?;
        for field in [&k, &v] {
            let len = u32::try_from(field.len())
                .ok()
                .filter(|l| *l <= FIELD_BYTES_MAX)
                .ok_or_else(|| corrupt(path, "a key or value too large to snapshot"))?;
            w.write_all(&len.to_be_bytes())?;
            w.write_all(field)?;
        }
        rows += 1;
        if w.bytes - synced >= SYNC_EVERY_BYTES {
            // Written back as it goes: a file of GiBs left dirty in the page cache is
            // flushed in one burst that holds every other fsync behind it (measured:
            // votes and log appends waited > 600 ms for 16 s, and the cluster had no
            // leader while three nodes wrote 900 MB snapshots at once).
            w.inner.flush()?;
            w.inner.get_ref().sync_data()?;
            synced = w.bytes;
            // And paced: a build shares the disk and the cores with the node's work.
            let due = Duration::from_secs_f64(w.bytes as f64 / WRITE_BYTES_PER_SEC as f64);
            // (Not in a simulation, whose time does not pass while a build runs.)
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                if !crate::rt::simulated() {
                    std::thread::sleep(ahead);
                }
            }
        }
    }
    w.write_all(&END.to_be_bytes())?;
    w.write_all(&rows.to_be_bytes())?;
    let hash = w.hash.digest();
    let bytes = w.bytes + 8;
    let mut file = w
        .inner
        .into_inner()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    file.write_all(&hash.to_be_bytes())?;
    file.sync_all()?;
    Ok(Summary {
        revision,
        rows,
        bytes,
    })
}

/// Reads a snapshot file row by row, checking its shape as it goes and its row count
/// and hash at the end.
pub struct Rows {
    path: PathBuf,
    r: BufReader<File>,
    hash: xxhash_rust::xxh3::Xxh3,
    bytes: u64,
    revision: u64,
    rows: u64,
    last: Option<Vec<u8>>,
    done: bool,
}

impl Rows {
    pub fn open(path: &Path) -> std::io::Result<Rows> {
        let mut rows = Rows {
            path: path.to_owned(),
            r: BufReader::with_capacity(IO_BUFFER_BYTES, File::open(path)?),
            hash: xxhash_rust::xxh3::Xxh3::new(),
            bytes: 0,
            revision: 0,
            rows: 0,
            last: None,
            done: false,
        };
        let mut magic = [0u8; 8];
        rows.read_hashed(&mut magic)?;
        if &magic != MAGIC {
            return Err(corrupt(path, "not a capkv snapshot"));
        }
        let mut version = [0u8; 1];
        rows.read_hashed(&mut version)?;
        if version[0] != VERSION {
            return Err(corrupt(
                path,
                format!("snapshot format {}, this capkv reads {VERSION}", version[0]),
            ));
        }
        rows.revision = rows.read_u64()?;
        Ok(rows)
    }

    /// The revision counter the snapshot carries.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn read_hashed(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt(&self.path, "cut short")
            } else {
                e
            }
        })?;
        self.hash.update(buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn read_u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.read_hashed(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_hashed(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn read_field(&mut self, len: u32) -> std::io::Result<Vec<u8>> {
        if len > FIELD_BYTES_MAX {
            return Err(corrupt(&self.path, format!("a field of {len} bytes")));
        }
        let mut v = vec![0u8; len as usize];
        self.read_hashed(&mut v)?;
        Ok(v)
    }

    /// The next row, or `None` at a verified end.
    pub fn next_row(&mut self) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let len = self.read_u32()?;
        if len == END {
            let rows = self.read_u64()?;
            let expected = self.hash.digest();
            let mut b = [0u8; 8];
            self.r
                .read_exact(&mut b)
                .map_err(|_| corrupt(&self.path, "cut short"))?;
            self.bytes += 8;
            if rows != self.rows {
                return Err(corrupt(
                    &self.path,
                    format!("says {rows} rows, holds {}", self.rows),
                ));
            }
            if u64::from_be_bytes(b) != expected {
                return Err(corrupt(&self.path, "hash mismatch"));
            }
            if self.r.read(&mut [0u8; 1])? != 0 {
                return Err(corrupt(&self.path, "bytes after the end"));
            }
            self.done = true;
            return Ok(None);
        }
        let key = self.read_field(len)?;
        let vlen = self.read_u32()?;
        let value = self.read_field(vlen)?;
        if self.last.as_ref().is_some_and(|l| *l >= key) {
            return Err(corrupt(&self.path, "keys out of order"));
        }
        self.last = Some(key.clone());
        self.rows += 1;
        Ok(Some((key, value)))
    }

    /// Reads to the end: the whole file checked.
    pub fn verify(mut self) -> std::io::Result<Summary> {
        while self.next_row()?.is_some() {}
        Ok(Summary {
            revision: self.revision,
            rows: self.rows,
            bytes: self.bytes,
        })
    }
}

/// Merges the snapshot at `path` into `tree`: afterwards the tree holds exactly the
/// snapshot's rows. The tree's rows are read from a frozen view taken first (what it held
/// before, never this merge's own writes), both sides one row at a time. Writes batches
/// of bounded size without fsync (the caller fsyncs once at the end). Blocking. Returns
/// the number of keys written or deleted.
pub fn merge_into(engine: &dyn Engine, tree: Tree, path: &Path) -> std::io::Result<u64> {
    let io = std::io::Error::other;
    let mut rows = Rows::open(path)?;
    let before = engine.read_view(tree).map_err(io)?;
    let mut old = before.iter_from(b"").peekable();
    let mut batch = WriteBatch::new();
    let mut batch_bytes = 0usize;
    let mut changed = 0u64;
    let flush = |batch: &mut WriteBatch, bytes: &mut usize, force: bool| {
        let full = *bytes >= INSTALL_BATCH_BYTES || batch.len() >= INSTALL_BATCH_OPS;
        if !batch.is_empty() && (force || full) {
            engine.write(std::mem::take(batch)).map_err(io)?;
            *bytes = 0;
        }
        Ok::<(), std::io::Error>(())
    };
    loop {
        let next = rows.next_row()?;
        // Old keys before the next snapshot key (or all that remain) are not in it.
        while let Some(item) = old.next_if(|item| match (item, &next) {
            (Err(_), _) | (Ok(_), None) => true,
            (Ok((k, _)), Some((nk, _))) => k < nk,
        }) {
            let (k, _) = item.map_err(io)?;
            batch_bytes += k.len();
            batch.delete(tree, k);
            changed += 1;
            flush(&mut batch, &mut batch_bytes, false)?;
        }
        let Some((k, v)) = next else { break };
        let same = match old.next_if(|item| matches!(item, Ok((ok, _)) if *ok == k)) {
            Some(Ok((_, ov))) => ov == v,
            _ => false,
        };
        if !same {
            batch_bytes += k.len() + v.len();
            batch.put(tree, k, v);
            changed += 1;
        }
        flush(&mut batch, &mut batch_bytes, false)?;
    }
    flush(&mut batch, &mut batch_bytes, true)?;
    Ok(changed)
}

/// The directory of a node's snapshot files.
pub struct SnapshotDir {
    dir: PathBuf,
    seq: AtomicU64,
}

impl SnapshotDir {
    pub fn open(dir: &Path) -> std::io::Result<SnapshotDir> {
        std::fs::create_dir_all(dir)?;
        Ok(SnapshotDir {
            dir: dir.to_owned(),
            seq: AtomicU64::new(0),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A file name no other snapshot has, in this process or any before it (`stem` for
    /// humans): a random part, since a restarted process may get the same pid (found by
    /// review: a rename then replaced the current snapshot's file under its old record).
    pub fn new_name(&self, stem: &str, ext: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{stem}-{:016x}-{n}.{ext}", crate::rt::random_u64())
    }

    /// Makes renames and new files in the directory durable.
    pub fn sync(&self) -> std::io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// Removes every file but `keep` (old snapshots, half-received or half-built ones).
    pub fn remove_all_but(&self, keep: Option<&str>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            if keep.is_some_and(|k| e.file_name() == k) {
                continue;
            }
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(file = %e.path().display(), error = %err, "removing an old snapshot file");
            }
        }
    }
}

/// openraft's handle on a snapshot: a file being read (sent) or written (received),
/// with its path, so an install can find the file it was given.
pub struct SnapshotFile {
    pub path: PathBuf,
    file: FileIo,
}

/// A snapshot file's I/O: on tokio's blocking pool, or in place in a simulation (see
/// [`crate::rt::blocking`]: a pool thread's timing would make the run unrepeatable).
enum FileIo {
    Pool(tokio::fs::File),
    InPlace {
        file: File,
        /// The outcome of the seek started by `start_seek`.
        seeked: Option<std::io::Result<u64>>,
    },
}

impl SnapshotFile {
    pub fn open(path: PathBuf) -> std::io::Result<SnapshotFile> {
        Ok(SnapshotFile::from_std(path.clone(), File::open(&path)?))
    }

    /// A file already open (it may since have been removed from the directory).
    pub fn from_std(path: PathBuf, file: File) -> SnapshotFile {
        let file = if crate::rt::simulated() {
            FileIo::InPlace { file, seeked: None }
        } else {
            FileIo::Pool(tokio::fs::File::from_std(file))
        };
        SnapshotFile { path, file }
    }

    pub fn create(path: PathBuf) -> std::io::Result<SnapshotFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(SnapshotFile::from_std(path, file))
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_read(cx, buf),
            FileIo::InPlace { file, .. } => {
                let n = std::io::Read::read(file, buf.initialize_unfilled())?;
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_write(cx, buf),
            FileIo::InPlace { file, .. } => Poll::Ready(std::io::Write::write(file, buf)),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_flush(cx),
            FileIo::InPlace { file, .. } => Poll::Ready(std::io::Write::flush(file)),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_shutdown(cx),
            FileIo::InPlace { file, .. } => Poll::Ready(std::io::Write::flush(file)),
        }
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: std::io::SeekFrom) -> std::io::Result<()> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).start_seek(position),
            FileIo::InPlace { file, seeked } => {
                *seeked = Some(std::io::Seek::seek(file, position));
                Ok(())
            }
        }
    }
    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_complete(cx),
            FileIo::InPlace { file, seeked } => Poll::Ready(
                seeked
                    .take()
                    .unwrap_or_else(|| std::io::Seek::stream_position(file)),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryEngine;

    fn fill(engine: &MemoryEngine, rows: &[(&str, &str)]) {
        let mut b = WriteBatch::new();
        for (k, v) in rows {
            b.put(Tree::Data, k.as_bytes().to_vec(), v.as_bytes().to_vec());
        }
        engine.write(b).unwrap();
    }

    fn all(engine: &MemoryEngine) -> Vec<(Vec<u8>, Vec<u8>)> {
        engine.range(Tree::Data, b"", None, usize::MAX).unwrap()
    }

    #[test]
    fn a_snapshot_file_round_trips_and_merges_into_any_state() {
        let dir = tempfile::tempdir().unwrap();
        let source = MemoryEngine::new();
        // More rows than one read, so the writer and the merge page.
        let rows: Vec<(String, String)> = (0..3000)
            .map(|i| (format!("k{i:05}"), format!("v{i}")))
            .collect();
        let refs: Vec<(&str, &str)> = rows.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        fill(&source, &refs);
        let view = source.read_view(Tree::Data).unwrap();
        fill(&source, &[("k00001", "after the view")]);
        let path = dir.path().join("s.snap");
        let summary = write(view.as_ref(), 42, &path).unwrap();
        assert_eq!(summary.rows, 3000);
        assert_eq!(
            summary.bytes,
            std::fs::metadata(&path).unwrap().len(),
            "the summary counts every byte"
        );
        assert_eq!(Rows::open(&path).unwrap().verify().unwrap(), summary);

        // Into a tree with keys before, between and after the snapshot's, some equal.
        let target = MemoryEngine::new();
        fill(
            &target,
            &[
                ("a", "gone"),
                ("k00000", "v0"),
                ("k00001", "old"),
                ("k015", "gone"),
                ("z", "gone"),
            ],
        );
        merge_into(&target, Tree::Data, &path).unwrap();
        let got = all(&target);
        assert_eq!(got.len(), 3000);
        for ((k, v), (gk, gv)) in rows.iter().zip(&got) {
            assert_eq!((k.as_bytes(), v.as_bytes()), (gk.as_slice(), gv.as_slice()));
        }
        // Merging again changes nothing; an empty snapshot empties the tree.
        assert_eq!(merge_into(&target, Tree::Data, &path).unwrap(), 0);
        let empty = dir.path().join("e.snap");
        write(
            MemoryEngine::new().read_view(Tree::Data).unwrap().as_ref(),
            0,
            &empty,
        )
        .unwrap();
        merge_into(&target, Tree::Data, &empty).unwrap();
        assert!(all(&target).is_empty());
    }

    /// Rows made up on demand: `rows` keys of `value_bytes` each, none held.
    struct Synthetic {
        rows: u64,
        value_bytes: usize,
    }

    impl ReadView for Synthetic {
        fn iter_from<'a>(
            &'a self,
            start: &[u8],
        ) -> Box<dyn Iterator<Item = crate::storage::Result<(Vec<u8>, Vec<u8>)>> + 'a> {
            let start = start.to_vec();
            Box::new(
                (0..self.rows)
                    .map(|i| format!("k{i:010}").into_bytes())
                    .filter(move |k| *k >= start)
                    .map(|k| {
                        let v = vec![k[k.len() - 1]; self.value_bytes];
                        Ok((k, v))
                    }),
            )
        }
    }

    /// An engine that keeps nothing: it counts what it is asked to write.
    #[derive(Default)]
    struct Discard(AtomicU64);

    impl Engine for Discard {
        fn get(&self, _: Tree, _: &[u8]) -> crate::storage::Result<Option<Vec<u8>>> {
            Ok(None)
        }
        fn range(
            &self,
            _: Tree,
            _: &[u8],
            _: Option<&[u8]>,
            _: usize,
        ) -> crate::storage::Result<Vec<(Vec<u8>, Vec<u8>)>> {
            Ok(Vec::new())
        }
        fn last_in_range(
            &self,
            _: Tree,
            _: &[u8],
            _: Option<&[u8]>,
        ) -> crate::storage::Result<Option<(Vec<u8>, Vec<u8>)>> {
            Ok(None)
        }
        fn write(&self, batch: WriteBatch) -> crate::storage::Result<()> {
            self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
            Ok(())
        }
        fn sync(&self) -> crate::storage::Result<()> {
            Ok(())
        }
        fn read_view(&self, _: Tree) -> crate::storage::Result<Box<dyn ReadView>> {
            Ok(Box::new(Synthetic {
                rows: 0,
                value_bytes: 0,
            }))
        }
    }

    fn peak_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// #9 item 6: nothing on a snapshot's path holds it in one buffer. Writing, checking
    /// and merging 128 MiB of rows raises the peak memory of a process of its own by a
    /// few MiB (run in a child so other tests' memory does not count).
    #[test]
    fn a_snapshot_passes_through_bounded_memory() {
        const CHILD: &str = "CAPKV_SNAPSHOT_MEMORY_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "cp::snapshot::tests::a_snapshot_passes_through_bounded_memory",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "the child ran the test: {text}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.snap");
        let before = peak_rss_kib();
        let view = Synthetic {
            rows: 2048,
            value_bytes: 64 << 10,
        };
        let summary = write(&view, 1, &path).unwrap();
        assert!(summary.bytes > 128 << 20);
        assert_eq!(Rows::open(&path).unwrap().verify().unwrap(), summary);
        let discard = Discard::default();
        assert_eq!(merge_into(&discard, Tree::Data, &path).unwrap(), 2048);
        assert_eq!(discard.0.load(Ordering::Relaxed), 2048);
        let grew_mib = (peak_rss_kib() - before) / 1024;
        eprintln!("peak memory grew {grew_mib} MiB for a 128 MiB snapshot");
        assert!(
            grew_mib < 32,
            "peak memory grew {grew_mib} MiB for a 128 MiB snapshot"
        );
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = MemoryEngine::new();
        fill(&source, &[("a", "1"), ("b", "2")]);
        let path = dir.path().join("s.snap");
        write(source.read_view(Tree::Data).unwrap().as_ref(), 7, &path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            Rows::open(&path).and_then(Rows::verify)
        };
        assert!(check(&good).is_ok());
        for cut in [0, 5, 20, good.len() - 1] {
            assert!(check(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = good.clone();
        flipped[18] ^= 1;
        assert!(check(&flipped).is_err(), "a flipped bit");
        let mut longer = good.clone();
        longer.push(0);
        assert!(check(&longer).is_err(), "bytes after the end");
        // A huge length is refused before anything is allocated for it.
        let mut huge = good[..17].to_vec();
        huge.extend_from_slice(&(FIELD_BYTES_MAX + 1).to_be_bytes());
        assert!(check(&huge).is_err());
    }
}

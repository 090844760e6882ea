//! The exact flat inner-product index on disk.
//!
//! An index is a folder:
//!
//! ```text
//! index.json         the manifest: format, version, embedder identity, dim,
//!                    commit number, generation, row count, chunk-file length,
//!                    and every source (path, content hash, its rows)
//! vectors-G.f32      rows × dim little-endian f32, row i is chunk id i
//! chunks-G.jsonl     one record per row: {"source", "lines": [first, last], "text"}
//! offsets-G.u64      rows little-endian u64: where record i ends in chunks-G.jsonl
//! writer.lock        taken (flock) by the one writer at a time; readers never lock
//! ```
//!
//! G is the generation. The manifest is the only thing that says what the
//! index holds: the first `rows` rows of the generation's files, of which the
//! live ones are those some source's range covers. Everything past those
//! lengths, and every file the manifest does not name, is left-over work of a
//! writer that never committed, and the next writer removes it.
//!
//! Writes: a writer appends rows to the current generation's files (never
//! touching the bytes the manifest covers), fsyncs them, then publishes a new
//! manifest by writing `index.json.tmp`, fsyncing it and renaming it over
//! `index.json` (then fsyncing the folder). Re-adding a source or removing
//! one only takes its rows out of the manifest; when more than a quarter of
//! the rows are dead, the commit instead copies the live rows into generation
//! G+1 and publishes that, then deletes generation G. A writer killed at any
//! moment therefore leaves the index as the last published manifest says,
//! which is as it was before its commit or after it.
//!
//! Reads: a reader reads the manifest and memory-maps the prefix of each file
//! the manifest covers. Those bytes never change, and a generation's files
//! stay alive while mapped even after a later writer deletes them, so an open
//! [`Index`] is a consistent snapshot however many commits happen meanwhile;
//! [`Index::reload`] moves to the newest one.
//!
//! Search is exact; see [`super::search`].

use super::search::{self, DeviceVectors};
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::error::{Error, Result};
use memmap2::{Mmap, MmapOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The manifest's file name inside an index folder.
pub const MANIFEST: &str = "index.json";
const MANIFEST_TMP: &str = "index.json.tmp";
const LOCK: &str = "writer.lock";
const FORMAT: &str = "engine flat-ip index";
const VERSION: u64 = 1;

fn vectors_name(g: u64) -> String {
    format!("vectors-{g}.f32")
}
fn chunks_name(g: u64) -> String {
    format!("chunks-{g}.jsonl")
}
fn offsets_name(g: u64) -> String {
    format!("offsets-{g}.u64")
}

/// The generation a data file of an index belongs to, if `name` is one.
fn data_file_generation(name: &str) -> Option<u64> {
    let (stem, ext) = name.split_once('.')?;
    let (kind, g) = stem.split_once('-')?;
    let matches = matches!(
        (kind, ext),
        ("vectors", "f32") | ("chunks", "jsonl") | ("offsets", "u64")
    );
    if matches {
        g.parse().ok()
    } else {
        None
    }
}

/// One chunk as the index stores it: where it came from and its text.
/// Lines are 1-based and inclusive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub source: String,
    pub line_start: usize,
    pub line_end: usize,
    pub text: String,
}

/// A piece of one source handed to [`Writer::add`]: lines 1-based, inclusive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub line_start: usize,
    pub line_end: usize,
    pub text: String,
}

/// One search result: the chunk's id (its row), its inner product with the
/// query, and the chunk.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub id: usize,
    pub score: f32,
    pub chunk: Chunk,
}

/// A source the index holds: its path, the content hash it was added with,
/// and the ids of its chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceInfo {
    pub source: String,
    pub hash: String,
    pub ids: Range<usize>,
}

/// The on-disk form of a chunk record: one JSON line.
#[derive(Deserialize)]
struct Record {
    source: String,
    lines: [usize; 2],
    text: String,
}

#[derive(Serialize)]
struct RecordRef<'a> {
    source: &'a str,
    lines: [usize; 2],
    text: &'a str,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SourceEntry {
    source: String,
    hash: String,
    start: usize,
    rows: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u64,
    embedder: String,
    dim: usize,
    /// Counts the commits, so a reader can tell that the index changed.
    commit: u64,
    generation: u64,
    /// Rows of the generation's files the manifest covers (live or dead).
    rows: usize,
    /// Bytes of the chunks file the manifest covers.
    chunk_bytes: usize,
    /// Sorted by path, no two alike; ranges inside `rows`, disjoint.
    sources: Vec<SourceEntry>,
}

fn no_index(dir: &Path) -> Error {
    Error::Invalid(format!(
        "{}: no index here (no {MANIFEST}); build one with `engine index add`",
        dir.display()
    ))
}

fn little_endian() -> Result<()> {
    if cfg!(target_endian = "big") {
        return Err(Error::Unsupported(
            "the index stores little-endian f32 and maps it as is; this machine is big-endian"
                .into(),
        ));
    }
    Ok(())
}

/// Reads and checks `dir/index.json`; `Ok(None)` when there is none.
fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let bad = |msg: String| Error::format(&path, msg);
    let v: Json =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a valid index manifest: {e}")))?;
    match v.get("format").and_then(Json::as_str) {
        Some(FORMAT) => {}
        Some(other) => return Err(bad(format!("format is {other:?}, not {FORMAT:?}"))),
        None => {
            return Err(bad(format!(
                "no \"format\": {FORMAT:?}; not an index manifest"
            )))
        }
    }
    match v.get("version").and_then(Json::as_u64) {
        Some(VERSION) => {}
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "{}: index format version {other}; this engine reads version {VERSION}",
                path.display()
            )))
        }
        None => return Err(bad("no \"version\" number".into())),
    }
    let m: Manifest =
        serde_json::from_value(v).map_err(|e| bad(format!("not a valid index manifest: {e}")))?;
    if m.dim == 0 {
        return Err(bad("dim is 0".into()));
    }
    let too_large = |per_row: usize| m.rows.checked_mul(per_row).is_none();
    if m.dim.checked_mul(4).is_none_or(too_large) || too_large(8) {
        return Err(bad(format!(
            "{} rows of dim {} is too large",
            m.rows, m.dim
        )));
    }
    for w in m.sources.windows(2) {
        if w[0].source >= w[1].source {
            return Err(bad(format!(
                "sources out of order or repeated: {:?} before {:?}",
                w[0].source, w[1].source
            )));
        }
    }
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(m.sources.len());
    for s in &m.sources {
        match s.start.checked_add(s.rows) {
            Some(end) if end <= m.rows => ranges.push((s.start, end)),
            _ => {
                return Err(bad(format!(
                    "source {:?}: rows {}..{}+{} lie past the index's {} rows",
                    s.source, s.start, s.start, s.rows, m.rows
                )))
            }
        }
    }
    ranges.retain(|r| r.0 < r.1);
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!(
                "two sources share rows {}..{}",
                w[1].0,
                w[0].1.min(w[1].1)
            )));
        }
    }
    Ok(Some(m))
}

/// Maps the first `len` bytes of `path` (None for 0), after checking that
/// the file holds at least that much.
fn map_prefix(path: &Path, len: usize, what: &str) -> Result<Option<Mmap>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let have = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if have < len as u64 {
        return Err(Error::format(
            path,
            format!("truncated: {have} bytes, the index manifest says {len} ({what})"),
        ));
    }
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: the mapped bytes lie inside the file (checked above), and the
    // index's writers never change bytes a published manifest covers: they
    // append past them or write a new generation. (Another program changing
    // the files is outside this contract, as with any mapped file.)
    let map = unsafe { MmapOptions::new().len(len).map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Some(map))
}

/// A read-only snapshot of an index: the manifest and maps of the files it
/// names. Cheap to open (nothing is read but the manifest); searching is
/// safe from many threads at once.
pub struct Index {
    dir: PathBuf,
    m: Manifest,
    vectors: Option<Mmap>,
    chunks: Option<Mmap>,
    offsets: Option<Mmap>,
    /// Bit i set: row i is live. None when every row is.
    live: Option<Vec<u64>>,
    count: usize,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("dir", &self.dir)
            .field("embedder", &self.m.embedder)
            .field("dim", &self.m.dim)
            .field("chunks", &self.count)
            .field("commit", &self.m.commit)
            .finish()
    }
}

impl Index {
    /// Creates an empty index in `dir` (made if missing; it must not hold an
    /// index already) for vectors of `embedder` with `dim` values, and opens it.
    pub fn create(dir: impl AsRef<Path>, embedder: &str, dim: usize) -> Result<Index> {
        Writer::create(dir.as_ref(), embedder, dim)?.commit()?;
        Index::open(dir)
    }

    /// Opens the index in `dir` as it is now.
    pub fn open(dir: impl AsRef<Path>) -> Result<Index> {
        let dir = dir.as_ref();
        little_endian()?;
        let mut tries = 0;
        loop {
            let m = read_manifest(dir)?.ok_or_else(|| no_index(dir))?;
            let generation = m.generation;
            match Index::map(dir, m) {
                Ok(ix) => return Ok(ix),
                Err(e) => {
                    // A writer may have replaced the generation between our
                    // reading the manifest and opening its files.
                    tries += 1;
                    let moved =
                        matches!(read_manifest(dir), Ok(Some(now)) if now.generation != generation);
                    if !moved || tries >= 8 {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn map(dir: &Path, m: Manifest) -> Result<Index> {
        let g = m.generation;
        let vectors = map_prefix(
            &dir.join(vectors_name(g)),
            m.rows * m.dim * 4,
            &format!("{} rows × dim {} × 4 bytes", m.rows, m.dim),
        )?;
        let offsets_path = dir.join(offsets_name(g));
        let offsets = map_prefix(
            &offsets_path,
            m.rows * 8,
            &format!("{} rows × 8 bytes", m.rows),
        )?;
        let chunks = map_prefix(&dir.join(chunks_name(g)), m.chunk_bytes, "chunk_bytes")?;
        let last_end = offsets.as_ref().map_or(0, |o| {
            u64::from_le_bytes(o[o.len() - 8..].try_into().expect("8 bytes"))
        });
        if last_end != m.chunk_bytes as u64 {
            return Err(Error::format(
                &offsets_path,
                format!(
                    "the last record ends at byte {last_end}, but the manifest says the chunks file holds {}",
                    m.chunk_bytes
                ),
            ));
        }
        let count: usize = m.sources.iter().map(|s| s.rows).sum();
        let live = (count != m.rows).then(|| {
            let mut bits = vec![0u64; m.rows.div_ceil(64)];
            for s in &m.sources {
                for id in s.start..s.start + s.rows {
                    bits[id / 64] |= 1 << (id % 64);
                }
            }
            bits
        });
        Ok(Index {
            dir: dir.to_path_buf(),
            m,
            vectors,
            chunks,
            offsets,
            live,
            count,
        })
    }

    /// Opens the index in `dir`, refusing it unless it holds vectors of
    /// `embedder` with `dim` values.
    pub fn open_for(dir: impl AsRef<Path>, embedder: &str, dim: usize) -> Result<Index> {
        let index = Index::open(dir)?;
        index.check_embedder(embedder, dim)?;
        Ok(index)
    }

    /// The index as it is now, if a writer has committed since this snapshot
    /// was opened; None if it is unchanged.
    pub fn reload(&self) -> Result<Option<Index>> {
        match read_manifest(&self.dir)? {
            Some(m) if m.commit == self.m.commit && m.generation == self.m.generation => Ok(None),
            _ => Index::open(&self.dir).map(Some),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity of the embedder whose vectors the index holds.
    pub fn embedder(&self) -> &str {
        &self.m.embedder
    }

    pub fn dim(&self) -> usize {
        self.m.dim
    }

    /// How many chunks the index holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Refuses an embedder other than the one the index was built with.
    pub fn check_embedder(&self, embedder: &str, dim: usize) -> Result<()> {
        check_embedder(&self.dir, &self.m.embedder, self.m.dim, embedder, dim)
    }

    /// The sources, in path order.
    pub fn sources(&self) -> Vec<SourceInfo> {
        self.m.sources.iter().map(source_info).collect()
    }

    pub fn source(&self, source: &str) -> Option<SourceInfo> {
        let i = self
            .m
            .sources
            .binary_search_by(|s| s.source.as_str().cmp(source))
            .ok()?;
        Some(source_info(&self.m.sources[i]))
    }

    fn is_live(&self, id: usize) -> bool {
        id < self.m.rows
            && self
                .live
                .as_ref()
                .is_none_or(|bits| bits[id / 64] >> (id % 64) & 1 == 1)
    }

    fn all_vectors(&self) -> &[f32] {
        // Page-aligned and a multiple of 4 bytes long (rows × dim × 4).
        self.vectors
            .as_ref()
            .map_or(&[], |v| bytemuck::cast_slice(&v[..]))
    }

    fn no_chunk(&self, id: usize) -> Error {
        Error::Invalid(format!(
            "{}: no chunk with id {id} (the index holds {} chunks)",
            self.dir.display(),
            self.count
        ))
    }

    /// The vector of chunk `id`.
    pub fn vector(&self, id: usize) -> Result<&[f32]> {
        if !self.is_live(id) {
            return Err(self.no_chunk(id));
        }
        let d = self.m.dim;
        Ok(&self.all_vectors()[id * d..(id + 1) * d])
    }

    /// The record of chunk `id`.
    pub fn chunk(&self, id: usize) -> Result<Chunk> {
        if !self.is_live(id) {
            return Err(self.no_chunk(id));
        }
        let offsets = self.offsets.as_ref().map_or(&[][..], |o| &o[..]);
        let end_of = |i: usize| {
            u64::from_le_bytes(offsets[i * 8..i * 8 + 8].try_into().expect("8 bytes")) as usize
        };
        let (start, end) = (if id == 0 { 0 } else { end_of(id - 1) }, end_of(id));
        if start > end || end > self.m.chunk_bytes {
            return Err(Error::format(
                self.dir.join(offsets_name(self.m.generation)),
                format!(
                    "row {id}: record bytes {start}..{end} lie outside the chunks file's {}",
                    self.m.chunk_bytes
                ),
            ));
        }
        let bytes = &self.chunks.as_ref().map_or(&[][..], |c| &c[..])[start..end];
        let r: Record = serde_json::from_slice(bytes).map_err(|e| {
            Error::format(
                self.dir.join(chunks_name(self.m.generation)),
                format!("row {id}: not a valid chunk record: {e}"),
            )
        })?;
        Ok(Chunk {
            source: r.source,
            line_start: r.lines[0],
            line_end: r.lines[1],
            text: r.text,
        })
    }

    fn check_queries(&self, queries: &[f32], what: &str) -> Result<usize> {
        let d = self.m.dim;
        if queries.is_empty() || !queries.len().is_multiple_of(d) {
            return Err(Error::Invalid(format!(
                "{what} has {} values; the index at {} holds vectors of dim {d}",
                queries.len(),
                self.dir.display()
            )));
        }
        if let Some(i) = queries.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "{what}: value {} of query {} is {}",
                i % d,
                i / d,
                queries[i]
            )));
        }
        Ok(queries.len() / d)
    }

    /// The k chunks whose vectors have the largest inner product with
    /// `query` (dim values), best first, ties by lower id.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        if query.len() != self.m.dim {
            return Err(Error::Invalid(format!(
                "the query has {} values; the index at {} holds vectors of dim {}",
                query.len(),
                self.dir.display(),
                self.m.dim
            )));
        }
        let ids = self.search_ids(query, k)?.pop().unwrap_or_default();
        self.hits(ids)
    }

    /// [`Index::search`] for n queries at once (`queries` is n × dim,
    /// row-major): one list of hits per query.
    pub fn search_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        self.search_batch_on(&Cpu, queries, k)
    }

    fn hits(&self, ids: Vec<(usize, f32)>) -> Result<Vec<Hit>> {
        ids.into_iter()
            .map(|(id, score)| {
                Ok(Hit {
                    id,
                    score,
                    chunk: self.chunk(id)?,
                })
            })
            .collect()
    }

    /// The search without reading the chunk records: (id, score) of the k
    /// best rows for each of the n queries in `queries` (n × dim).
    pub fn search_ids(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        self.search_ids_on(&Cpu, queries, k)
    }

    /// [`Index::search_ids`] on `be`'s device: on the CPU the vectors are
    /// searched where they lie, in the memory map; elsewhere the live vectors
    /// are uploaded first (keep a [`DeviceVectors`] to search one upload
    /// many times).
    pub fn search_ids_on<B: Backend>(
        &self,
        be: &B,
        queries: &[f32],
        k: usize,
    ) -> Result<Vec<Vec<(usize, f32)>>> {
        let nq = self.check_queries(queries, "the query batch")?;
        let k = k.min(self.count);
        if k == 0 {
            return Ok(vec![Vec::new(); nq]);
        }
        if be.is_host() {
            let live = self.live.as_deref();
            return Ok(search::on_host(
                self.all_vectors(),
                self.m.dim,
                live,
                queries,
                k,
            ));
        }
        DeviceVectors::upload(be, self)?.search_ids(be, queries, k)
    }

    /// [`Index::search_batch`] on `be`'s device, as [`Index::search_ids_on`].
    pub fn search_batch_on<B: Backend>(
        &self,
        be: &B,
        queries: &[f32],
        k: usize,
    ) -> Result<Vec<Vec<Hit>>> {
        self.search_ids_on(be, queries, k)?
            .into_iter()
            .map(|ids| self.hits(ids))
            .collect()
    }

    /// The ids of the live rows, ascending.
    pub fn live_ids(&self) -> Vec<usize> {
        (0..self.m.rows).filter(|&id| self.is_live(id)).collect()
    }
}

fn source_info(s: &SourceEntry) -> SourceInfo {
    SourceInfo {
        source: s.source.clone(),
        hash: s.hash.clone(),
        ids: s.start..s.start + s.rows,
    }
}

fn check_embedder(
    dir: &Path,
    have: &str,
    have_dim: usize,
    want: &str,
    want_dim: usize,
) -> Result<()> {
    if have == want && have_dim == want_dim {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: the index holds vectors of embedder {have:?} (dim {have_dim}), not {want:?} (dim {want_dim}); \
         vectors of different embedders cannot be compared: use another index folder, or remove this one and rebuild it",
        dir.display()
    )))
}

/// The three files of a generation, open for appending.
struct Files {
    vectors: BufWriter<File>,
    chunks: BufWriter<File>,
    offsets: BufWriter<File>,
}

/// The one writer of an index: holds the folder's lock from open until it
/// is dropped. Changes are invisible to readers until [`Writer::commit`];
/// a writer dropped (or killed) before it leaves the index as it was.
pub struct Writer {
    dir: PathBuf,
    _lock: File,
    embedder: String,
    dim: usize,
    commit: u64,
    generation: u64,
    /// Rows and chunk bytes written, committed or not.
    rows: usize,
    chunk_bytes: usize,
    sources: BTreeMap<String, SourceEntry>,
    /// Whether a manifest exists (false for an index being created).
    published: bool,
    changed: bool,
    force_compact: bool,
    files: Option<Files>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("dir", &self.dir)
            .field("embedder", &self.embedder)
            .field("dim", &self.dim)
            .field("sources", &self.sources.len())
            .finish()
    }
}

impl Writer {
    /// Starts a new index in `dir` (made if missing), which must not hold
    /// one already. Nothing is visible until the commit.
    pub fn create(dir: impl AsRef<Path>, embedder: &str, dim: usize) -> Result<Writer> {
        let dir = dir.as_ref();
        if dim == 0 {
            return Err(Error::Invalid(format!(
                "{}: an index needs vectors of at least one value (dim 0)",
                dir.display()
            )));
        }
        if embedder.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: an index needs the identity of its embedder (got an empty one)",
                dir.display()
            )));
        }
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let (lock, m) = Writer::lock(dir)?;
        if m.is_some() {
            return Err(Error::Invalid(format!(
                "{}: an index exists here already",
                dir.display()
            )));
        }
        let w = Writer {
            dir: dir.to_path_buf(),
            _lock: lock,
            embedder: embedder.to_string(),
            dim,
            commit: 0,
            generation: 1,
            rows: 0,
            chunk_bytes: 0,
            sources: BTreeMap::new(),
            published: false,
            changed: true,
            force_compact: false,
            files: None,
        };
        w.clean()?;
        Ok(w)
    }

    /// Opens the index in `dir` for writing, waiting for any other writer
    /// to finish.
    pub fn open(dir: impl AsRef<Path>) -> Result<Writer> {
        let dir = dir.as_ref();
        if !dir.join(MANIFEST).exists() {
            return Err(no_index(dir));
        }
        let (lock, m) = Writer::lock(dir)?;
        let m = m.ok_or_else(|| no_index(dir))?;
        let w = Writer {
            dir: dir.to_path_buf(),
            _lock: lock,
            embedder: m.embedder,
            dim: m.dim,
            commit: m.commit,
            generation: m.generation,
            rows: m.rows,
            chunk_bytes: m.chunk_bytes,
            sources: m
                .sources
                .into_iter()
                .map(|s| (s.source.clone(), s))
                .collect(),
            published: true,
            changed: false,
            force_compact: false,
            files: None,
        };
        w.clean()?;
        Ok(w)
    }

    /// Opens the index in `dir`, refusing it if it was built with another
    /// embedder, or starts one there if there is none.
    pub fn open_or_create(dir: impl AsRef<Path>, embedder: &str, dim: usize) -> Result<Writer> {
        let dir = dir.as_ref();
        if dir.join(MANIFEST).exists() {
            let w = Writer::open(dir)?;
            w.check_embedder(embedder, dim)?;
            Ok(w)
        } else {
            Writer::create(dir, embedder, dim)
        }
    }

    /// Takes the folder's lock (waiting for it) and reads the manifest.
    fn lock(dir: &Path) -> Result<(File, Option<Manifest>)> {
        little_endian()?;
        let path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        lock.lock().map_err(|e| Error::io(&path, e))?;
        let m = read_manifest(dir)?;
        Ok((lock, m))
    }

    /// Removes what writers that never committed left behind: data files
    /// of other generations and a temporary manifest.
    fn clean(&self) -> Result<()> {
        for e in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let e = e.map_err(|e| Error::io(&self.dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = name == MANIFEST_TMP
                || data_file_generation(&name)
                    .is_some_and(|g| !self.published || g != self.generation);
            if stale {
                // Best effort: a file that stays is overwritten or removed later.
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn embedder(&self) -> &str {
        &self.embedder
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn check_embedder(&self, embedder: &str, dim: usize) -> Result<()> {
        check_embedder(&self.dir, &self.embedder, self.dim, embedder, dim)
    }

    /// The hash `source` was added with, if the index holds it: a caller
    /// whose file still has that hash can skip embedding it again.
    pub fn source_hash(&self, source: &str) -> Option<&str> {
        self.sources.get(source).map(|s| s.hash.as_str())
    }

    /// The sources, in path order, as they stand in this writer.
    pub fn sources(&self) -> Vec<SourceInfo> {
        self.sources.values().map(source_info).collect()
    }

    /// The current generation's files, opened (and created) on first use,
    /// cut back to what this writer has written: a writer that never
    /// committed may have left more.
    fn files(&mut self) -> Result<&mut Files> {
        if self.files.is_none() {
            let g = self.generation;
            let open = |name: String, len: usize| -> Result<BufWriter<File>> {
                let path = self.dir.join(name);
                let mut f = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(&path, e))?;
                let have = f.metadata().map_err(|e| Error::io(&path, e))?.len();
                if have < len as u64 {
                    return Err(Error::format(
                        &path,
                        format!("truncated: {have} bytes, the index manifest says {len}"),
                    ));
                }
                f.set_len(len as u64).map_err(|e| Error::io(&path, e))?;
                f.seek(SeekFrom::End(0)).map_err(|e| Error::io(&path, e))?;
                Ok(BufWriter::with_capacity(1 << 20, f))
            };
            self.files = Some(Files {
                vectors: open(vectors_name(g), self.rows * self.dim * 4)?,
                chunks: open(chunks_name(g), self.chunk_bytes)?,
                offsets: open(offsets_name(g), self.rows * 8)?,
            });
        }
        Ok(self.files.as_mut().expect("just opened"))
    }

    /// Adds `source` (a path, or any name) with its pieces and their vectors
    /// (pieces.len() × dim, row-major), replacing what the index held for it.
    /// `hash` is stored for [`Writer::source_hash`]: anything that changes
    /// when the pieces would (the file's content hash, with the chunking
    /// settings).
    pub fn add(
        &mut self,
        source: &str,
        hash: &str,
        pieces: &[Piece],
        vectors: &[f32],
    ) -> Result<()> {
        if source.is_empty() {
            return Err(Error::Invalid(
                "a source needs a name (got an empty one)".into(),
            ));
        }
        let d = self.dim;
        if vectors.len() != pieces.len() * d {
            return Err(Error::Invalid(format!(
                "{source}: {} pieces need {} × {d} vector values, got {}",
                pieces.len(),
                pieces.len(),
                vectors.len()
            )));
        }
        if let Some(i) = vectors.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "{source}: the vector of piece {} (lines {}-{}) has a non-finite value {}",
                i / d,
                pieces[i / d].line_start,
                pieces[i / d].line_end,
                vectors[i]
            )));
        }
        let (dir, g) = (self.dir.clone(), self.generation);
        let start = self.rows;
        let mut chunk_bytes = self.chunk_bytes;
        let files = self.files()?;
        let mut bytes = Vec::with_capacity(vectors.len() * 4);
        for x in vectors {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        files
            .vectors
            .write_all(&bytes)
            .map_err(|e| Error::io(dir.join(vectors_name(g)), e))?;
        let mut ends = Vec::with_capacity(pieces.len() * 8);
        for p in pieces {
            let mut line = serde_json::to_vec(&RecordRef {
                source,
                lines: [p.line_start, p.line_end],
                text: &p.text,
            })
            .expect("records serialize");
            line.push(b'\n');
            files
                .chunks
                .write_all(&line)
                .map_err(|e| Error::io(dir.join(chunks_name(g)), e))?;
            chunk_bytes += line.len();
            ends.extend_from_slice(&(chunk_bytes as u64).to_le_bytes());
        }
        files
            .offsets
            .write_all(&ends)
            .map_err(|e| Error::io(dir.join(offsets_name(g)), e))?;
        self.rows += pieces.len();
        self.chunk_bytes = chunk_bytes;
        self.sources.insert(
            source.to_string(),
            SourceEntry {
                source: source.to_string(),
                hash: hash.to_string(),
                start,
                rows: pieces.len(),
            },
        );
        self.changed = true;
        Ok(())
    }

    /// Removes `source` and its chunks; false if the index does not hold it.
    pub fn remove(&mut self, source: &str) -> bool {
        let had = self.sources.remove(source).is_some();
        self.changed |= had;
        had
    }

    /// Makes the commit copy the live rows into a new generation, whatever
    /// the share of dead ones (otherwise it does so past a quarter).
    pub fn compact(&mut self) {
        self.force_compact = true;
    }

    /// Makes the changes visible, atomically, and releases the lock.
    pub fn commit(mut self) -> Result<()> {
        if !self.changed && !self.force_compact {
            return Ok(());
        }
        let (dir, g) = (self.dir.clone(), self.generation);
        let files = self.files()?;
        for (f, name) in [
            (&mut files.vectors, vectors_name(g)),
            (&mut files.chunks, chunks_name(g)),
            (&mut files.offsets, offsets_name(g)),
        ] {
            let path = dir.join(name);
            f.flush().map_err(|e| Error::io(&path, e))?;
            f.get_ref().sync_data().map_err(|e| Error::io(&path, e))?;
        }
        self.files = None;
        let live: usize = self.sources.values().map(|s| s.rows).sum();
        let dead = self.rows - live;
        if self.force_compact || dead * 4 > self.rows {
            self.compact_into_next_generation()
        } else {
            self.publish()
        }
    }

    /// Copies the live rows, in source order, into the next generation's
    /// files, publishes it and deletes the old generation.
    fn compact_into_next_generation(&mut self) -> Result<()> {
        let (old, new) = (self.generation, self.generation + 1);
        let d = self.dim;
        let dir = self.dir.clone();
        let vectors = map_prefix(&dir.join(vectors_name(old)), self.rows * d * 4, "rows")?;
        let offsets = map_prefix(&dir.join(offsets_name(old)), self.rows * 8, "rows")?;
        let chunks = map_prefix(&dir.join(chunks_name(old)), self.chunk_bytes, "chunk_bytes")?;
        let (vectors, offsets, chunks) = (
            vectors.as_ref().map_or(&[][..], |m| &m[..]),
            offsets.as_ref().map_or(&[][..], |m| &m[..]),
            chunks.as_ref().map_or(&[][..], |m| &m[..]),
        );
        let end_of = |i: usize| {
            u64::from_le_bytes(offsets[i * 8..i * 8 + 8].try_into().expect("8 bytes")) as usize
        };
        let create = |name: String| -> Result<(PathBuf, BufWriter<File>)> {
            let path = dir.join(name);
            let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
            Ok((path, BufWriter::with_capacity(1 << 20, f)))
        };
        let (vp, mut vf) = create(vectors_name(new))?;
        let (cp, mut cf) = create(chunks_name(new))?;
        let (op, mut of) = create(offsets_name(new))?;
        let mut sources = BTreeMap::new();
        let (mut rows, mut bytes) = (0usize, 0usize);
        for (name, s) in &self.sources {
            vf.write_all(&vectors[s.start * d * 4..(s.start + s.rows) * d * 4])
                .map_err(|e| Error::io(&vp, e))?;
            for id in s.start..s.start + s.rows {
                let (a, b) = (if id == 0 { 0 } else { end_of(id - 1) }, end_of(id));
                if a > b || b > chunks.len() {
                    return Err(Error::format(
                        dir.join(offsets_name(old)),
                        format!("row {id}: record bytes {a}..{b} lie outside the chunks file"),
                    ));
                }
                cf.write_all(&chunks[a..b]).map_err(|e| Error::io(&cp, e))?;
                bytes += b - a;
                of.write_all(&(bytes as u64).to_le_bytes())
                    .map_err(|e| Error::io(&op, e))?;
            }
            sources.insert(
                name.clone(),
                SourceEntry {
                    start: rows,
                    ..s.clone()
                },
            );
            rows += s.rows;
        }
        for (f, path) in [(vf, &vp), (cf, &cp), (of, &op)] {
            let f = f
                .into_inner()
                .map_err(|e| Error::io(path, e.into_error()))?;
            f.sync_data().map_err(|e| Error::io(path, e))?;
        }
        self.generation = new;
        self.rows = rows;
        self.chunk_bytes = bytes;
        self.sources = sources;
        self.publish()?;
        // Readers that mapped the old generation keep it until they close.
        for name in [vectors_name(old), chunks_name(old), offsets_name(old)] {
            let _ = fs::remove_file(dir.join(name));
        }
        Ok(())
    }

    /// Writes the manifest under a temporary name, fsyncs it and renames it
    /// into place: the one moment the index changes.
    fn publish(&mut self) -> Result<()> {
        let m = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            embedder: self.embedder.clone(),
            dim: self.dim,
            commit: self.commit + 1,
            generation: self.generation,
            rows: self.rows,
            chunk_bytes: self.chunk_bytes,
            sources: self.sources.values().cloned().collect(),
        };
        let mut text = serde_json::to_string_pretty(&m).expect("manifests serialize");
        text.push('\n');
        let tmp = self.dir.join(MANIFEST_TMP);
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        let path = self.dir.join(MANIFEST);
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        #[cfg(unix)]
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&self.dir, e))?;
        self.commit = m.commit;
        self.published = true;
        self.changed = false;
        Ok(())
    }
}

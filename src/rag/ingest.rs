//! Files into the index: walk the given paths, cut each file into chunks
//! (`rag::chunk`), embed them (`model::bert`) and hand them to an index
//! writer (`rag::index`). A file whose content and chunking settings are
//! unchanged since it was added is skipped; a changed one replaces its
//! chunks.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::bert::Embedder;
use crate::rag::chunk::{chunk_file, Chunk, ChunkOptions, Format};
use crate::rag::index::{Piece, Writer};
use std::path::{Path, PathBuf};

/// What one file came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Added (or replaced) with this many chunks.
    Added(usize),
    /// The index already holds this content, chunked the same way.
    Unchanged,
    /// The file has no text: nothing added (and what it held is removed).
    Empty,
}

/// The files under `paths`, in a stable order: a file as given, a folder's
/// files with a known extension (`Format::from_path`), recursively, hidden
/// entries skipped. A named file of unknown type is an error; a missing path
/// too.
pub fn files_under(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else if Format::from_path(p).is_some() {
            out.push(p.clone());
        } else {
            return Err(Error::Unsupported(format!(
                "{}: not a text, Markdown or HTML file (by its extension)",
                p.display()
            )));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if Format::from_path(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// The name a file is stored and cited under: the path as given, with
/// `./` dropped and `/` separators.
pub fn source_name(path: &Path) -> String {
    let s = path.to_string_lossy().replace('\\', "/");
    s.strip_prefix("./").unwrap_or(&s).to_string()
}

/// A hash of what the chunks of `bytes` depend on: the content and the
/// chunking settings (xxh3, 64 bits).
pub fn content_hash(bytes: &[u8], opts: &ChunkOptions) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(bytes);
    h.update(format!("chunk {} overlap {}", opts.max_tokens, opts.overlap).as_bytes());
    format!("{:016x}", h.digest())
}

/// Chunks, embeds and adds one file to `writer` (uncommitted).
pub fn add_file<B: Backend>(
    writer: &mut Writer,
    embedder: &Embedder<B>,
    opts: &ChunkOptions,
    path: &Path,
) -> Result<Outcome> {
    let source = source_name(path);
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let hash = content_hash(&bytes, opts);
    if writer.source_hash(&source) == Some(hash.as_str()) {
        return Ok(Outcome::Unchanged);
    }
    let chunks = chunk_file(path, opts, embedder)?;
    if chunks.is_empty() {
        writer.remove(&source);
        return Ok(Outcome::Empty);
    }
    let (pieces, vectors) = embed_chunks(embedder, chunks)?;
    writer.add(&source, &hash, &pieces, &vectors)?;
    Ok(Outcome::Added(pieces.len()))
}

/// Chunks as the index stores them, and their vectors (row-major).
pub fn embed_chunks<B: Backend>(
    embedder: &Embedder<B>,
    chunks: Vec<Chunk>,
) -> Result<(Vec<Piece>, Vec<f32>)> {
    let texts: Vec<String> = chunks.iter().map(|c| c.embedding_text()).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vectors: Vec<f32> = embedder.embed(&refs)?.concat();
    let pieces = chunks
        .into_iter()
        .map(|c| Piece {
            line_start: c.first_line,
            line_end: c.last_line,
            text: c.text,
        })
        .collect();
    Ok((pieces, vectors))
}

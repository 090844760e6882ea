//! `engine index`: a RAG index of documents — add, remove, list, search.

use super::common::{count, cpu_unless_asked, folder, on_device, DeviceArg};
use anyhow::{bail, Result};
use engine::backend::Backend;
use engine::model::bert::Embedder;
use engine::rag::chunk::ChunkOptions;
use engine::rag::index::{Index, Writer};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Add files, or folders recursively (.txt, .md, .html): chunk, embed and
    /// store them. A changed file replaces its chunks; an unchanged one is
    /// skipped. Creates the index on first use.
    Add {
        /// The index folder.
        #[arg(long, value_name = "DIR")]
        index: PathBuf,
        /// The embedder: a sentence-transformers folder (models/all-minilm-l6-v2).
        #[arg(long, value_name = "DIR")]
        embedder: PathBuf,
        /// Most tokens per chunk (the embedder's tokens, [CLS]/[SEP] included).
        #[arg(long, value_name = "N", default_value_t = 256, value_parser = count, allow_negative_numbers = true)]
        chunk_tokens: usize,
        /// Tokens a chunk repeats from the previous one where a paragraph is cut.
        #[arg(long, value_name = "N", default_value_t = 32, value_parser = count, allow_negative_numbers = true)]
        overlap: usize,
        /// Where the embedder runs [default: auto: the CPU, until a real GPU
        /// has run the encoder's kernels].
        #[arg(long, value_enum)]
        device: Option<DeviceArg>,
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Remove files, or every file under a folder, from the index.
    Rm {
        /// The index folder.
        #[arg(long, value_name = "DIR")]
        index: PathBuf,
        /// Files or folders, as they were added.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List the indexed files and their chunks.
    Ls {
        /// The index folder.
        #[arg(long, value_name = "DIR")]
        index: PathBuf,
    },
    /// The chunks nearest a query, best first.
    Search {
        /// The index folder.
        #[arg(long, value_name = "DIR")]
        index: PathBuf,
        /// The embedder the index was built with.
        #[arg(long, value_name = "DIR")]
        embedder: PathBuf,
        /// How many chunks.
        #[arg(short, default_value_t = 5, value_parser = count, allow_negative_numbers = true)]
        k: usize,
        /// Print a JSON array of {"rank", "score", "source", "lines", "text"}.
        #[arg(long)]
        json: bool,
        /// Where the embedder runs, and the search with it [default: auto:
        /// the CPU].
        #[arg(long, value_enum)]
        device: Option<DeviceArg>,
        /// The query.
        query: String,
    },
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        Command::Add {
            index,
            embedder,
            chunk_tokens,
            overlap,
            device,
            paths,
        } => {
            folder("embedder", &embedder)?;
            let opts = ChunkOptions {
                max_tokens: chunk_tokens,
                overlap,
            };
            on_device!(cpu_unless_asked(device, "the encoder")?, |be| add(
                be, &index, &embedder, &opts, &paths
            ))
        }
        Command::Rm { index, paths } => rm(&index, &paths),
        Command::Ls { index } => ls(&index),
        Command::Search {
            index,
            embedder,
            k,
            json,
            device,
            query,
        } => {
            folder("embedder", &embedder)?;
            on_device!(cpu_unless_asked(device, "the encoder")?, |be| search(
                be, &index, &embedder, k, json, &query
            ))
        }
    }
}

fn add<B: Backend>(
    be: B,
    index: &Path,
    embedder_dir: &Path,
    opts: &ChunkOptions,
    paths: &[PathBuf],
) -> Result<()> {
    use engine::rag::ingest::{add_file, files_under, Outcome};
    let files = files_under(paths)?;
    let embedder = Embedder::load(embedder_dir, be)?;
    let mut writer = Writer::open_or_create(index, embedder.identity(), embedder.dim())?;
    let bar = indicatif::ProgressBar::new(files.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} files  {msg}")
            .expect("a valid template"),
    );
    let (mut added, mut chunks, mut unchanged, mut empty) = (0, 0, 0, Vec::new());
    for f in &files {
        bar.set_message(f.display().to_string());
        match add_file(&mut writer, &embedder, opts, f)? {
            Outcome::Added(n) => (added, chunks) = (added + 1, chunks + n),
            Outcome::Unchanged => unchanged += 1,
            Outcome::Empty => empty.push(f.display().to_string()),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    writer.commit()?;
    for e in &empty {
        eprintln!("{e}: no text, skipped");
    }
    let ix = Index::open(index)?;
    println!(
        "added {added} file(s) ({chunks} chunks), {unchanged} unchanged; {} holds {} chunk(s) from {} file(s)",
        index.display(),
        ix.len(),
        ix.sources().len()
    );
    Ok(())
}

fn rm(index: &Path, paths: &[PathBuf]) -> Result<()> {
    let mut writer = Writer::open(index)?;
    let mut removed = 0;
    for p in paths {
        let name = engine::rag::ingest::source_name(p);
        let folder = format!("{}/", name.trim_end_matches('/'));
        let matching: Vec<String> = writer
            .sources()
            .into_iter()
            .map(|s| s.source)
            .filter(|s| *s == name || s.starts_with(&folder))
            .collect();
        if matching.is_empty() {
            bail!("{}: not in the index {}", name, index.display());
        }
        for s in matching {
            writer.remove(&s);
            removed += 1;
        }
    }
    writer.commit()?;
    println!("removed {removed} file(s) from {}", index.display());
    Ok(())
}

fn ls(index: &Path) -> Result<()> {
    let ix = Index::open(index)?;
    let sources = ix.sources();
    println!(
        "{}: {} chunk(s) from {} file(s), embedder {} ({} values)",
        index.display(),
        sources.iter().map(|s| s.ids.len()).sum::<usize>(),
        sources.len(),
        ix.embedder(),
        ix.dim()
    );
    for s in sources {
        println!("{:>6}  {}", s.ids.len(), s.source);
    }
    Ok(())
}

fn search<B: Backend>(
    be: B,
    index: &Path,
    embedder_dir: &Path,
    k: usize,
    json: bool,
    query: &str,
) -> Result<()> {
    let ix = Index::open(index)?;
    let embedder = Embedder::load(embedder_dir, be)?;
    ix.check_embedder(embedder.identity(), embedder.dim())?;
    let q = embedder.embed(&[query])?.remove(0);
    // Search where the query was embedded: on a GPU through its matrix
    // product and top-k kernels.
    let hits = ix.search_batch_on(embedder.backend(), &q, k)?.remove(0);
    let mut out = std::io::stdout().lock();
    if json {
        let items: Vec<serde_json::Value> = hits
            .iter()
            .enumerate()
            .map(|(i, h)| {
                serde_json::json!({
                    "rank": i + 1,
                    "score": h.score,
                    "source": h.chunk.source,
                    "lines": [h.chunk.line_start, h.chunk.line_end],
                    "text": h.chunk.text,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(items))?;
    } else {
        for (i, h) in hits.iter().enumerate() {
            let c = &h.chunk;
            let line: String = c.text.split_whitespace().collect::<Vec<_>>().join(" ");
            let shown: String = line.chars().take(90).collect();
            let more = if shown.len() < line.len() { "…" } else { "" };
            writeln!(
                out,
                "{:>2}. {:.4}  {}:{}-{}  {shown}{more}",
                i + 1,
                h.score,
                c.source,
                c.line_start,
                c.line_end
            )?;
        }
    }
    Ok(())
}

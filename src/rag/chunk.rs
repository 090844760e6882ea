//! Cutting documents into chunks for the index.
//!
//! A document — plain text, Markdown, or HTML with its tags stripped — becomes
//! a list of [`Chunk`]s. Each holds at most `max_tokens` tokens as a
//! caller-supplied [`TokenCounter`] counts them (the embedder's own tokenizer;
//! the chunker depends on none), and the 1-based, inclusive range of lines it
//! came from in the original file.
//!
//! Where a document is cut, in order of preference:
//! 1. A heading (Markdown `#`…`######` or `===`/`---` underlined, HTML
//!    `<h1>`…`<h6>`) always starts a new chunk. Every chunk carries its
//!    heading path ("Policies > Travel") in [`Chunk::heading`], and
//!    [`Chunk::embedding_text`] puts that path in front of the text. A heading
//!    with nothing under it before the next heading does not stand alone: it
//!    opens the next section's first chunk.
//! 2. Between paragraphs (blank-line separated; in HTML also where a line
//!    starts with a block tag such as `<p>` or `<li>`): small neighbouring
//!    paragraphs are packed together up to the budget.
//! 3. After a sentence end, then at a line end, then between words — and for
//!    a single "word" longer than the budget (a long URL, text without
//!    spaces), between characters.
//!
//! When a cut falls inside a paragraph, the next chunk starts by repeating the
//! last ~`overlap` tokens before the cut (from a sentence start when one is
//! close), so a passage split in two still reads whole in one of them. Cuts
//! between paragraphs and at headings repeat nothing.
//!
//! Bad input is an error naming the file, never a panic: a file that cannot
//! be read is [`Error::Io`]; a binary file (a NUL byte), UTF-16 or text that is
//! not UTF-8 is [`Error::Format`]; an unknown extension is
//! [`Error::Unsupported`]. An empty or whitespace-only file (or HTML with no
//! text in it) is not an error: it gives `Ok` with **no chunks**, and the
//! caller reports it ("notes.md: no text, skipped").

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::path::Path;

/// How a document's text is read, chosen by file extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `.txt`, `.text`, or no extension: lines and blank-line paragraphs.
    Text,
    /// `.md`, `.markdown`: plain text plus headings (outside code fences).
    Markdown,
    /// `.html`, `.htm`: tags stripped, `<script>`/`<style>` dropped, entities
    /// decoded; every original line stays one line.
    Html,
}

impl Format {
    /// The format for `path`'s extension (case-insensitive); `None` for an
    /// extension engine does not read.
    pub fn from_path(path: &Path) -> Option<Format> {
        let Some(ext) = path.extension() else {
            return Some(Format::Text);
        };
        match ext.to_string_lossy().to_ascii_lowercase().as_str() {
            "txt" | "text" => Some(Format::Text),
            "md" | "markdown" => Some(Format::Markdown),
            "html" | "htm" => Some(Format::Html),
            _ => None,
        }
    }
}

/// Counts the tokens of a text as the embedding model will see it. Counting
/// special tokens too ([CLS]/[SEP] for BERT) makes `max_tokens` the model's
/// own sequence limit (256 for all-MiniLM-L6-v2).
pub trait TokenCounter {
    fn count(&self, text: &str) -> Result<usize>;
}

/// Any `Fn(&str) -> usize`, e.g. `|s: &str| s.split_whitespace().count()`.
impl<F: Fn(&str) -> usize> TokenCounter for F {
    fn count(&self, text: &str) -> Result<usize> {
        Ok(self(text))
    }
}

/// The embedder's own tokenizer, before its truncation.
impl<B: crate::backend::Backend> TokenCounter for crate::model::bert::Embedder<B> {
    fn count(&self, text: &str) -> Result<usize> {
        self.count_tokens(text)
    }
}

/// A Hugging Face tokenizer, special tokens included. It must not truncate or
/// pad: sentence-transformers' tokenizer.json files often set both to 128,
/// which would make every text count 128 — so that is an error here, not a
/// silent wrong count. Clear them with `with_truncation(None)` and
/// `with_padding(None)` after loading.
impl TokenCounter for tokenizers::Tokenizer {
    fn count(&self, text: &str) -> Result<usize> {
        if self.get_truncation().is_some() || self.get_padding().is_some() {
            return Err(Error::Invalid(
                "token counting needs a tokenizer without truncation and padding \
                 (tokenizer.json sets them; clear them with with_truncation(None) and with_padding(None))"
                    .into(),
            ));
        }
        let enc = self
            .encode_fast(text, true)
            .map_err(|e| Error::Invalid(format!("cannot tokenize text: {e}")))?;
        Ok(enc.len())
    }
}

/// The token budget of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkOptions {
    /// Most tokens in a chunk's [`Chunk::embedding_text`], as the counter
    /// counts them.
    pub max_tokens: usize,
    /// About how many tokens a chunk repeats from the end of the previous one
    /// when a paragraph is cut in two. At most half of `max_tokens`.
    pub overlap: usize,
}

impl Default for ChunkOptions {
    /// 256 tokens (all-MiniLM-L6-v2's limit, [CLS]/[SEP] included), 32 overlap.
    fn default() -> Self {
        ChunkOptions {
            max_tokens: 256,
            overlap: 32,
        }
    }
}

/// One piece of a document, ready to embed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The document it came from (the path as given, or the caller's name).
    pub source: String,
    /// The headings it sits under, outermost first: "Policies > Travel";
    /// empty before the first heading and in plain text. (Cut to the last
    /// heading, or to nothing, where the path would take more than a quarter
    /// of the budget.)
    pub heading: String,
    /// The document's own text, from a word on `first_line` to a word on
    /// `last_line`, line breaks kept, trailing spaces of each line dropped
    /// (HTML: tags stripped, entities decoded, spaces collapsed).
    pub text: String,
    /// First line, 1-based, in the original file.
    pub first_line: usize,
    /// Last line, 1-based and inclusive, in the original file.
    pub last_line: usize,
    /// Tokens of [`Chunk::embedding_text`], as the counter counted them.
    pub tokens: usize,
}

impl Chunk {
    /// What to embed: the heading path on its own line, then the text.
    pub fn embedding_text(&self) -> String {
        with_heading(&self.heading, &self.text)
    }
}

fn with_heading(heading: &str, text: &str) -> String {
    if heading.is_empty() {
        text.to_string()
    } else {
        format!("{heading}\n{text}")
    }
}

/// Reads `path` (format by extension, see [`Format::from_path`]) and cuts it
/// into chunks. `Ok(vec![])` means the file has no text; see the module
/// documentation for the errors.
pub fn chunk_file(
    path: &Path,
    opts: &ChunkOptions,
    counter: &dyn TokenCounter,
) -> Result<Vec<Chunk>> {
    let format = Format::from_path(path).ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: not a document engine reads (by extension: .txt, .text, .md, .markdown, .html, .htm, or none)",
            path.display()
        ))
    })?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = decode_text(path, &bytes)?;
    chunk_text(&path.display().to_string(), text, format, opts, counter)
}

/// The text of a file's bytes: UTF-8, a leading byte-order mark dropped.
fn decode_text<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
        return Err(Error::format(
            path,
            "UTF-16 text; engine reads UTF-8 (save the file as UTF-8)",
        ));
    }
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err(Error::format(
            path,
            format!("a binary file, not text (NUL byte at byte {at})"),
        ));
    }
    std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        Error::format(
            path,
            format!(
                "not UTF-8 text (an invalid byte at offset {}, line {line}); engine reads UTF-8 .txt, .md and .html files",
                e.valid_up_to()
            ),
        )
    })
}

/// Cuts `text` (a document in `format`) into chunks; `source` names it in
/// each chunk. `Ok(vec![])` when there is no text. Errors only for bad
/// options or a counter that fails.
pub fn chunk_text(
    source: &str,
    text: &str,
    format: Format,
    opts: &ChunkOptions,
    counter: &dyn TokenCounter,
) -> Result<Vec<Chunk>> {
    if opts.overlap > opts.max_tokens / 2 {
        return Err(Error::Invalid(format!(
            "chunk overlap ({}) must be at most half the chunk size ({} tokens)",
            opts.overlap, opts.max_tokens
        )));
    }
    let one = counter.count("x")?;
    if one > opts.max_tokens {
        return Err(Error::Invalid(format!(
            "a chunk size of {} tokens is too small: one character already counts {one}",
            opts.max_tokens
        )));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines = match format {
        Format::Text => plain_lines(text),
        Format::Markdown => markdown_lines(text),
        Format::Html => html_lines(text),
    };
    let mut chunks = Vec::new();
    for section in sections(&lines) {
        let prefix = heading_prefix(&section.path, opts, counter)?;
        let cutter = Cutter::new(&lines, &section, &prefix, opts, counter);
        cutter.cut(source, &mut chunks)?;
    }
    Ok(chunks)
}

// ---------------------------------------------------------------------------
// Lines: the document as one cleaned string per original line.

#[derive(Debug, Default)]
struct Line {
    /// The line's text, trailing whitespace (and a CR) dropped.
    text: String,
    /// A heading starts here: level, title, and how many lines it takes (2
    /// for a Markdown underlined heading).
    heading: Option<(u8, String, usize)>,
    /// A new paragraph starts here even without a blank line before (HTML).
    breaks: bool,
}

fn plain_lines(text: &str) -> Vec<Line> {
    text.split('\n')
        .map(|l| Line {
            text: l.trim_end().to_string(),
            ..Line::default()
        })
        .collect()
}

fn markdown_lines(text: &str) -> Vec<Line> {
    let mut lines = plain_lines(text);
    let mut fence: Option<(u8, usize)> = None;
    let mut i = 0;
    while i < lines.len() {
        let t = &lines[i].text;
        if let Some((ch, n)) = fence_marker(t) {
            match fence {
                None => fence = Some((ch, n)),
                Some((open, len)) if open == ch && n >= len => fence = None,
                Some(_) => {}
            }
            i += 1;
            continue;
        }
        if fence.is_some() {
            i += 1;
            continue;
        }
        if let Some((level, title)) = atx_heading(t) {
            lines[i].heading = Some((level, title, 1));
        } else if i + 1 < lines.len()
            && can_be_setext_title(t)
            && (i == 0 || lines[i - 1].text.trim().is_empty() || lines[i - 1].heading.is_some())
        {
            if let Some(level) = setext_underline(&lines[i + 1].text) {
                lines[i].heading = Some((level, t.trim().to_string(), 2));
                i += 2;
                continue;
            }
        }
        i += 1;
    }
    lines
}

/// Leading spaces of a Markdown line, if at most 3 (more is a code block).
fn md_indent(line: &str) -> Option<usize> {
    let n = line.len() - line.trim_start_matches(' ').len();
    (n <= 3).then_some(n)
}

/// A code fence: ``` or ~~~ (at least 3), its character and length.
fn fence_marker(line: &str) -> Option<(u8, usize)> {
    let rest = &line[md_indent(line)?..];
    let ch = *rest.as_bytes().first()?;
    if ch != b'`' && ch != b'~' {
        return None;
    }
    let n = rest.bytes().take_while(|&b| b == ch).count();
    (n >= 3).then_some((ch, n))
}

/// `## Title ##` → (2, "Title").
fn atx_heading(line: &str) -> Option<(u8, String)> {
    let rest = &line[md_indent(line)?..];
    let level = rest.bytes().take_while(|&b| b == b'#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let after = &rest[level..];
    if !after.is_empty() && !after.starts_with([' ', '\t']) {
        return None;
    }
    let title = after.trim();
    let unclosed = title.trim_end_matches('#');
    let title = if unclosed.is_empty() {
        ""
    } else if unclosed.ends_with([' ', '\t']) {
        unclosed.trim_end()
    } else {
        title
    };
    Some((level as u8, title.to_string()))
}

fn can_be_setext_title(line: &str) -> bool {
    let Some(indent) = md_indent(line) else {
        return false;
    };
    let rest = &line[indent..];
    !rest.is_empty()
        && !rest.starts_with(['>', '|'])
        && !["- ", "* ", "+ "].iter().any(|m| rest.starts_with(m))
        && setext_underline(line).is_none()
}

/// `===` → 1, `---` → 2.
fn setext_underline(line: &str) -> Option<u8> {
    let rest = line[md_indent(line)?..].trim_end();
    if !rest.is_empty() && rest.bytes().all(|b| b == b'=') {
        Some(1)
    } else if rest.len() >= 2 && rest.bytes().all(|b| b == b'-') {
        Some(2)
    } else {
        None
    }
}

/// Tags whose start or end begins a new block (a paragraph break when they
/// come first on a line; a space in the text otherwise).
const BLOCK_TAGS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "br",
    "caption",
    "dd",
    "details",
    "div",
    "dl",
    "dt",
    "figcaption",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "summary",
    "table",
    "tbody",
    "td",
    "tfoot",
    "th",
    "thead",
    "title",
    "tr",
    "ul",
];

/// Tags whose contents are not text.
const RAW_TAGS: &[&str] = &["script", "style", "noscript", "template"];

/// HTML to lines: tags, comments and `<script>`/`<style>` contents dropped,
/// entities decoded, spaces collapsed — with every `\n` of the source kept, so
/// line `i` of the result is line `i` of the file.
fn html_lines(src: &str) -> Vec<Line> {
    let mut lines = vec![Line::default()];
    // The open heading: level, title so far, the line it opened on.
    let mut heading: Option<(u8, String, usize)> = None;
    let mut i = 0;
    let bytes = src.as_bytes();
    // Skips to just past `end` (or the end of input), keeping the newlines.
    fn skip_to(src: &str, from: usize, end: &str, lines: &mut Vec<Line>) -> usize {
        let hay = &src[from..];
        let stop = find_ascii_ci(hay, end).map_or(hay.len(), |p| p + end.len());
        for _ in hay[..stop].matches('\n') {
            lines.push(Line::default());
        }
        from + stop
    }
    while i < src.len() {
        let c = src[i..].chars().next().unwrap_or(' ');
        if c == '\n' {
            lines.push(Line::default());
            if let Some((_, title, _)) = heading.as_mut() {
                title.push(' ');
            }
            i += 1;
            continue;
        }
        if c == '<' {
            let next = bytes.get(i + 1).copied().unwrap_or(b' ');
            if src[i..].starts_with("<!--") {
                i = skip_to(src, i + 4, "-->", &mut lines);
                continue;
            }
            if next.is_ascii_alphabetic() || next == b'/' || next == b'!' || next == b'?' {
                let end = tag_end(src, i + 1);
                let body = &src[i + 1..end.min(src.len())];
                for _ in body.matches('\n') {
                    lines.push(Line::default());
                }
                i = (end + 1).min(src.len());
                let closing = body.starts_with('/');
                let name: String = body
                    .trim_start_matches('/')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect::<String>()
                    .to_ascii_lowercase();
                if !closing && RAW_TAGS.contains(&name.as_str()) && !body.ends_with('/') {
                    i = skip_to(src, i, &format!("</{name}"), &mut lines);
                    i = (tag_end(src, i) + 1).min(src.len());
                    continue;
                }
                if BLOCK_TAGS.contains(&name.as_str()) {
                    let line = lines.last_mut().expect("one line at least");
                    if line.text.trim().is_empty() {
                        line.breaks = true;
                    }
                    line.text.push(' ');
                }
                let level = match name.as_bytes() {
                    [b'h', d @ b'1'..=b'6'] => Some(d - b'0'),
                    _ => None,
                };
                if let Some(level) = level {
                    if !closing {
                        heading = Some((level, String::new(), lines.len() - 1));
                    } else if let Some((level, title, at)) = heading.take() {
                        let title = title.split_whitespace().collect::<Vec<_>>().join(" ");
                        if lines[at].heading.is_none() {
                            lines[at].heading = Some((level, title, 1));
                        }
                    }
                }
                continue;
            }
        }
        let (decoded, len) = if c == '&' {
            decode_entity(&src[i..]).unwrap_or(('&', 1))
        } else {
            (c, c.len_utf8())
        };
        lines
            .last_mut()
            .expect("one line at least")
            .text
            .push(decoded);
        if let Some((_, title, _)) = heading.as_mut() {
            title.push(decoded);
        }
        i += len;
    }
    for line in &mut lines {
        line.text = line.text.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    lines
}

/// The index of the `>` ending the tag whose name starts at `from`, quotes
/// respected; `src.len()` when it never ends.
fn tag_end(src: &str, from: usize) -> usize {
    let mut quote = None;
    for (k, b) in src.as_bytes()[from.min(src.len())..].iter().enumerate() {
        match (quote, b) {
            (None, b'>') => return from + k,
            (None, b'"' | b'\'') => quote = Some(*b),
            (Some(q), b) if q == *b => quote = None,
            _ => {}
        }
    }
    src.len()
}

/// Where ASCII `needle` first occurs in `hay`, ignoring ASCII case.
fn find_ascii_ci(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    (0..=h.len().checked_sub(n.len())?).find(|&k| h[k..k + n.len()].eq_ignore_ascii_case(n))
}

/// The character an entity at the start of `s` stands for, and its length in
/// bytes; `None` for an unknown or malformed one (kept as written).
fn decode_entity(s: &str) -> Option<(char, usize)> {
    let semi = s.as_bytes().iter().take(12).position(|&b| b == b';')?;
    let name = &s[1..semi];
    let c = if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse::<u32>().ok()?,
        };
        match code {
            0 => '\u{fffd}',
            _ => char::from_u32(code).unwrap_or('\u{fffd}'),
        }
    } else {
        match name {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            "nbsp" => ' ',
            "ndash" => '–',
            "mdash" => '—',
            "hellip" => '…',
            "lsquo" => '‘',
            "rsquo" => '’',
            "ldquo" => '“',
            "rdquo" => '”',
            "copy" => '©',
            "reg" => '®',
            "trade" => '™',
            "euro" => '€',
            "pound" => '£',
            "deg" => '°',
            "middot" => '·',
            "bull" => '•',
            "times" => '×',
            _ => return None,
        }
    };
    Some((c, semi + 1))
}

// ---------------------------------------------------------------------------
// Sections: a heading and what is under it, up to the next heading.

struct Section {
    /// Lines `start..end` (0-based).
    start: usize,
    end: usize,
    /// Lines at the start that are the heading itself (0 before any heading).
    heading_lines: usize,
    /// "Policies > Travel".
    path: String,
}

fn sections(lines: &[Line]) -> Vec<Section> {
    let mut stack: Vec<(u8, String)> = Vec::new();
    let mut out = vec![Section {
        start: 0,
        end: lines.len(),
        heading_lines: 0,
        path: String::new(),
    }];
    for (i, line) in lines.iter().enumerate() {
        if let Some((level, title, span)) = &line.heading {
            out.last_mut().expect("a section").end = i;
            while stack.last().is_some_and(|(l, _)| l >= level) {
                stack.pop();
            }
            stack.push((*level, title.clone()));
            let path = stack
                .iter()
                .map(|(_, t)| t.as_str())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" > ");
            out.push(Section {
                start: i,
                end: lines.len(),
                heading_lines: *span,
                path,
            });
        }
    }
    // Drop what holds no text; a heading with nothing under it opens the
    // next section instead of standing alone.
    let blank = |a: usize, b: usize| {
        lines[a..b.min(lines.len())]
            .iter()
            .all(|l| l.text.trim().is_empty())
    };
    let mut kept: Vec<Section> = Vec::new();
    let mut carry: Option<usize> = None;
    let n = out.len();
    for (k, mut s) in out.into_iter().enumerate() {
        if let Some(start) = carry.take() {
            // The carried headings count as heading lines of this section.
            s.heading_lines += s.start - start;
            s.start = start;
        }
        if blank(s.start, s.end) {
            continue;
        }
        let body_from = if s.heading_lines > 0 {
            s.end.min(s.start + s.heading_lines)
        } else {
            s.start
        };
        if s.heading_lines > 0 && blank(body_from, s.end) && k + 1 < n {
            carry = Some(s.start);
            continue;
        }
        kept.push(s);
    }
    kept
}

/// The heading path to put in front of a section's chunks: the whole path,
/// or just the last heading, or nothing — whatever takes at most a quarter
/// of the budget.
fn heading_prefix(path: &str, opts: &ChunkOptions, counter: &dyn TokenCounter) -> Result<String> {
    let limit = opts.max_tokens / 4;
    if path.is_empty() || counter.count(path)? <= limit {
        return Ok(path.to_string());
    }
    let last = path.rsplit(" > ").next().unwrap_or(path);
    if counter.count(last)? <= limit {
        return Ok(last.to_string());
    }
    Ok(String::new())
}

// ---------------------------------------------------------------------------
// Cutting one section.

/// What kind of boundary follows a word; larger is a better place to cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Break {
    Word,
    Line,
    Sentence,
    Paragraph,
}

struct Word {
    /// Bytes `start..end` of the section text.
    start: usize,
    end: usize,
    /// 1-based line in the file.
    line: usize,
    after: Break,
}

struct Cutter<'a> {
    text: String,
    words: Vec<Word>,
    prefix: &'a str,
    opts: &'a ChunkOptions,
    counter: &'a dyn TokenCounter,
    /// Tokens per word, as the last search saw them.
    rate: Cell<f64>,
}

impl<'a> Cutter<'a> {
    fn new(
        lines: &[Line],
        section: &'a Section,
        prefix: &'a str,
        opts: &'a ChunkOptions,
        counter: &'a dyn TokenCounter,
    ) -> Self {
        let mut text = String::new();
        let mut words: Vec<Word> = Vec::new();
        let mut last_of_prev: Option<usize> = None; // last word of the previous non-blank line
        let mut prev_is_heading = false;
        let mut blank_since = false;
        for (li, line) in lines
            .iter()
            .enumerate()
            .take(section.end)
            .skip(section.start)
        {
            let base = text.len();
            text.push_str(&line.text);
            text.push('\n');
            let first = words.len();
            push_words(&line.text, base, li + 1, &mut words);
            if words.len() == first {
                blank_since = true;
                continue;
            }
            if let Some(w) = last_of_prev {
                if (blank_since || line.breaks) && !prev_is_heading {
                    words[w].after = Break::Paragraph;
                }
            }
            let last = words.len() - 1;
            if words[last].after < Break::Line {
                words[last].after = Break::Line;
            }
            last_of_prev = Some(last);
            prev_is_heading = li < section.start + section.heading_lines;
            blank_since = false;
        }
        Cutter {
            text,
            words,
            prefix,
            opts,
            counter,
            rate: Cell::new(1.5),
        }
    }

    /// Tokens of the embedding text for bytes `a..b` of the section.
    fn tokens(&self, a: usize, b: usize) -> Result<usize> {
        self.counter
            .count(&with_heading(self.prefix, &self.text[a..b]))
    }

    /// Tokens of the embedding text of words `i..j`.
    fn span_tokens(&self, i: usize, j: usize) -> Result<usize> {
        self.tokens(self.words[i].start, self.words[j - 1].end)
    }

    /// [`last_fitting`] over words, learning how many tokens a word takes.
    fn last_fitting(
        &self,
        lo: usize,
        c_lo: usize,
        hi: usize,
        limit: usize,
        cost: impl FnMut(usize) -> Result<usize>,
    ) -> Result<(usize, usize)> {
        let (x, c, rate) = last_fitting(lo, c_lo, hi, limit, self.rate.get(), cost)?;
        self.rate.set(rate);
        Ok((x, c))
    }

    fn push(
        &self,
        source: &str,
        (a, b): (usize, usize),
        (first_line, last_line): (usize, usize),
        tokens: usize,
        out: &mut Vec<Chunk>,
    ) {
        out.push(Chunk {
            source: source.to_string(),
            heading: self.prefix.to_string(),
            text: self.text[a..b].to_string(),
            first_line,
            last_line,
            tokens,
        });
    }

    fn cut(&self, source: &str, out: &mut Vec<Chunk>) -> Result<()> {
        let max = self.opts.max_tokens;
        let n = self.words.len();
        let mut i = 0;
        // Where the previous chunk ended: the next one must reach past it.
        let mut done = 0;
        while i < n {
            let first = self.span_tokens(i, i + 1)?;
            if first > max {
                self.cut_word(source, i, out)?;
                i += 1;
                done = i;
                continue;
            }
            let (j_max, t_max) =
                self.last_fitting(i + 1, first, n, max, |j| self.span_tokens(i, j))?;
            let (j, tokens) = if j_max == n {
                (n, t_max)
            } else {
                self.best_cut(i, (done + 1).max(i + 1), j_max, t_max)?
            };
            let (wi, wj) = (&self.words[i], &self.words[j - 1]);
            self.push(source, (wi.start, wj.end), (wi.line, wj.line), tokens, out);
            if j == n {
                break;
            }
            done = j;
            let k = self.overlap_start(i, j)?;
            // Without room to reach past this chunk, the next one repeats nothing.
            i = if k < j && self.span_tokens(k, j + 1)? > max {
                j
            } else {
                k
            };
        }
        Ok(())
    }

    /// Where to end a chunk that starts at word `i`, must end at `min_end`
    /// or later, and may run to `j_max` (`t_max` tokens): the last paragraph
    /// end in its last three quarters, else the last sentence end in its
    /// second half, else the last line end there, else `j_max` itself.
    /// Returns the end and the chunk's tokens.
    fn best_cut(
        &self,
        i: usize,
        min_end: usize,
        j_max: usize,
        t_max: usize,
    ) -> Result<(usize, usize)> {
        let span = j_max - i;
        for (kind, min_words) in [
            (Break::Paragraph, span.div_ceil(4)),
            (Break::Sentence, span.div_ceil(2)),
            (Break::Line, span.div_ceil(2)),
        ] {
            let from = (i + min_words).max(min_end);
            if let Some(j) = (from..=j_max)
                .rev()
                .find(|&j| self.words[j - 1].after >= kind)
            {
                if j == j_max {
                    return Ok((j, t_max));
                }
                // Token counts are not strictly monotonic in the words: check.
                let t = self.span_tokens(i, j)?;
                if t <= self.opts.max_tokens {
                    return Ok((j, t));
                }
            }
        }
        Ok((j_max, t_max))
    }

    /// Where the chunk after words `i..j` starts: `j` when the cut is
    /// between paragraphs, else early enough to repeat ~`overlap` tokens of
    /// the same paragraph (from a sentence start if that keeps half of them).
    fn overlap_start(&self, i: usize, j: usize) -> Result<usize> {
        if self.opts.overlap == 0 || self.words[j - 1].after == Break::Paragraph {
            return Ok(j);
        }
        // Not before the paragraph's first word, and past `i`.
        let mut lo = j - 1;
        while lo > i + 1 && self.words[lo - 1].after != Break::Paragraph {
            lo -= 1;
        }
        if lo <= i {
            return Ok(j);
        }
        let end = self.words[j - 1].end;
        // Tokens of the last `m` words.
        let cost = |m: usize| self.counter.count(&self.text[self.words[j - m].start..end]);
        let c1 = cost(1)?;
        if c1 > self.opts.overlap {
            return Ok(j);
        }
        let (m, _) = self.last_fitting(1, c1, j - lo, self.opts.overlap, cost)?;
        let k = j - m;
        if let Some(s) = (k..j).find(|&s| self.words[s - 1].after >= Break::Sentence) {
            if 2 * (j - s) >= j - k {
                return Ok(s);
            }
        }
        Ok(k)
    }

    /// Chunks of a single word too long for the budget, cut between
    /// characters.
    fn cut_word(&self, source: &str, w: usize, out: &mut Vec<Chunk>) -> Result<()> {
        let Word {
            start, end, line, ..
        } = self.words[w];
        let ends: Vec<usize> = self.text[start..end]
            .char_indices()
            .map(|(o, c)| start + o + c.len_utf8())
            .collect();
        let max = self.opts.max_tokens;
        let mut a = start;
        let mut e0 = 0; // index into `ends` of the first character of the piece
        while a < end {
            let cost = |k: usize| self.tokens(a, ends[k - 1]);
            let c1 = cost(e0 + 1)?;
            // One character always goes in, fitting or not (the options are
            // checked so that one does).
            let (k, t) = if c1 > max {
                (e0 + 1, c1)
            } else {
                let (k, t, _) = last_fitting(e0 + 1, c1, ends.len(), max, 1.0, cost)?;
                (k, t)
            };
            self.push(source, (a, ends[k - 1]), (line, line), t, out);
            a = ends[k - 1];
            e0 = k;
        }
        Ok(())
    }
}

/// Words of `line` (at byte `base` of the section text, on file line `no`):
/// runs of non-space characters, also ended after a CJK full stop.
fn push_words(line: &str, base: usize, no: usize, words: &mut Vec<Word>) {
    let mut start: Option<usize> = None;
    let end_word = |s: usize, e: usize, words: &mut Vec<Word>| {
        let w = &line[s..e];
        let after = if sentence_end(w) {
            Break::Sentence
        } else {
            Break::Word
        };
        words.push(Word {
            start: base + s,
            end: base + e,
            line: no,
            after,
        });
    };
    for (o, c) in line.char_indices() {
        if c.is_whitespace() {
            if let Some(s) = start.take() {
                end_word(s, o, words);
            }
        } else {
            let s = *start.get_or_insert(o);
            if matches!(c, '。' | '！' | '？') {
                end_word(s, o + c.len_utf8(), words);
                start = None;
            }
        }
    }
    if let Some(s) = start {
        end_word(s, line.len(), words);
    }
}

/// Whether a word ends a sentence: `.`, `!`, `?` (or their CJK forms), maybe
/// followed by closing quotes and brackets.
fn sentence_end(word: &str) -> bool {
    let w = word.trim_end_matches(['"', '\'', ')', ']', '}', '*', '_', '”', '’', '»']);
    w.ends_with(['.', '!', '?', '…', '。', '！', '？'])
}

/// The largest `x` in `lo..=hi` whose `cost(x)` is within `limit`, given
/// `c_lo = cost(lo) <= limit`, with its cost. Costs here are token counts,
/// which grow about linearly with `x`: each guess interpolates between the
/// nearest points known to fit and not to fit (before one that does not is
/// known, it extrapolates at `rate` per step), so a search takes a few calls;
/// every fourth guess bisects instead (or doubles, while nothing is known
/// not to fit), which bounds the calls where costs are far from linear. Also returns the cost per step seen, for the next search.
fn last_fitting(
    lo: usize,
    c_lo: usize,
    hi: usize,
    limit: usize,
    rate: f64,
    mut cost: impl FnMut(usize) -> Result<usize>,
) -> Result<(usize, usize, f64)> {
    let (mut good, mut c_good) = (lo, c_lo);
    let mut bad: Option<(usize, usize)> = None;
    let mut rate = rate.max(1e-3);
    let mut guesses = 0;
    loop {
        let top = bad.map_or(hi, |(x, _)| x - 1);
        if good >= top {
            return Ok((good, c_good, rate));
        }
        guesses += 1;
        let room = (limit - c_good) as f64;
        let step = match bad {
            Some(_) if guesses % 4 == 0 => (top - good).div_ceil(2),
            None if guesses % 4 == 0 => 2 * (good - lo + 1),
            Some((x, c)) if c > c_good => (room * (x - good) as f64 / (c - c_good) as f64) as usize,
            // At least a quarter token a step, so one guess never counts
            // far more text than can fit.
            _ => (room / rate.max(0.25)) as usize,
        };
        let x = good.saturating_add(step).clamp(good + 1, top);
        let c = cost(x)?;
        rate = (c.saturating_sub(c_lo) as f64 / (x - lo) as f64).max(1e-3);
        if c <= limit {
            (good, c_good) = (x, c);
        } else {
            bad = Some((x, c));
        }
    }
}

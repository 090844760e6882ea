//! Chunking (src/rag/chunk.rs): line ranges point into the original file,
//! every chunk is within budget, nothing is lost, headings start chunks,
//! split paragraphs overlap, HTML is stripped with its line numbers kept, and
//! bad files give one clear error.

mod common;

use engine::rag::chunk::{chunk_file, chunk_text, Chunk, ChunkOptions, Format, TokenCounter};
use engine::Error;
use rand::Rng;
use std::path::{Path, PathBuf};

/// One token per whitespace-separated word.
fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn opts(max_tokens: usize, overlap: usize) -> ChunkOptions {
    ChunkOptions {
        max_tokens,
        overlap,
    }
}

fn chunk(text: &str, format: Format, o: ChunkOptions) -> Vec<Chunk> {
    chunk_text("doc", text, format, &o, &words).unwrap()
}

/// The original file's lines, trailing whitespace (and CR) dropped.
fn file_lines(text: &str) -> Vec<String> {
    text.split('\n').map(|l| l.trim_end().to_string()).collect()
}

/// Checks what holds for every chunk of `original` (plain text or Markdown,
/// whose lines are their own text): within budget, its count right, and its
/// text found in lines `first_line..=last_line`, starting on the first and
/// ending on the last.
fn check_lines(original: &str, chunks: &[Chunk], o: ChunkOptions, counter: &dyn TokenCounter) {
    let lines = file_lines(original);
    for (n, c) in chunks.iter().enumerate() {
        let what = format!("chunk {n} (lines {}-{})", c.first_line, c.last_line);
        assert!(c.tokens <= o.max_tokens, "{what}: {} tokens", c.tokens);
        assert_eq!(
            c.tokens,
            counter.count(&c.embedding_text()).unwrap(),
            "{what}"
        );
        assert!(!c.text.trim().is_empty(), "{what}: empty");
        assert!(1 <= c.first_line && c.first_line <= c.last_line && c.last_line <= lines.len());
        let slice = lines[c.first_line - 1..c.last_line].join("\n");
        assert!(
            slice.contains(&c.text),
            "{what}: {:?} not in {slice:?}",
            c.text
        );
        let first = c.text.lines().next().unwrap();
        let last = c.text.lines().last().unwrap();
        assert!(
            lines[c.first_line - 1].contains(first),
            "{what} starts elsewhere"
        );
        assert!(
            lines[c.last_line - 1].contains(last),
            "{what} ends elsewhere"
        );
    }
}

/// Walks the document's words through the chunks in order: each chunk is a
/// run of consecutive words, starting on its first line, that starts at or
/// before where the previous one ended (an overlap) and reaches past it;
/// together they cover every word. Returns the overlap (in words) before
/// each chunk.
fn check_coverage(original: &str, chunks: &[Chunk]) -> Vec<usize> {
    // Every word of the document with its line.
    let doc: Vec<(usize, &str)> = original
        .split('\n')
        .enumerate()
        .flat_map(|(i, l)| l.split_whitespace().map(move |w| (i + 1, w)))
        .collect();
    let mut pos: usize = 0;
    let mut overlaps = Vec::new();
    for (n, c) in chunks.iter().enumerate() {
        let cw: Vec<&str> = c.text.split_whitespace().collect();
        let start = (pos.saturating_sub(cw.len())..=pos)
            .find(|&s| {
                s + cw.len() > pos
                    && s + cw.len() <= doc.len()
                    && doc[s].0 == c.first_line
                    && doc[s..s + cw.len()]
                        .iter()
                        .map(|w| w.1)
                        .eq(cw.iter().copied())
            })
            .unwrap_or_else(|| panic!("chunk {n} {:?} does not continue at word {pos}", c.text));
        overlaps.push(pos - start);
        pos = start + cw.len();
    }
    assert_eq!(pos, doc.len(), "words after the last chunk");
    overlaps
}

fn check_all(text: &str, chunks: &[Chunk], o: ChunkOptions) -> Vec<usize> {
    check_lines(text, chunks, o, &words);
    check_coverage(text, chunks)
}

/// `n` sentences of `len` words, numbered so that every word is unique.
fn sentences(tag: &str, n: usize, len: usize) -> String {
    (0..n)
        .map(|s| {
            let mut w: Vec<String> = (0..len).map(|k| format!("{tag}{s}w{k}")).collect();
            w[len - 1].push('.');
            w.join(" ")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

const HANDBOOK: &str = "\
Quillmark employee handbook, kept by People Ops.

# Policies

These apply to everyone.

## Travel

Book trips through the portal. Trains under five hours.
Flights are economy class.

Hotels up to a nightly limit.

## Expenses

Claims go in the app within thirty days.

```sh
# not a heading: a shell comment in a code fence
ledgerly submit --trip 42
```

# Handbook

## Leave

Twenty-five days a year.

Setext title
============

Under the setext title.
";

#[test]
fn line_ranges_point_at_the_original_lines() {
    for o in [
        opts(256, 32),
        opts(12, 4),
        opts(6, 3),
        opts(3, 1),
        opts(2, 1),
    ] {
        let chunks = chunk(HANDBOOK, Format::Markdown, o);
        check_all(HANDBOOK, &chunks, o);
    }
    // Exact ranges with a roomy budget: one chunk per section.
    let chunks = chunk(HANDBOOK, Format::Markdown, opts(256, 32));
    let ranges: Vec<(usize, usize, &str)> = chunks
        .iter()
        .map(|c| (c.first_line, c.last_line, c.heading.as_str()))
        .collect();
    assert_eq!(
        ranges,
        [
            (1, 1, ""),
            (3, 5, "Policies"),
            (7, 12, "Policies > Travel"),
            (14, 21, "Policies > Expenses"),
            (23, 27, "Handbook > Leave"),
            (29, 32, "Setext title"),
        ]
    );
    let lines = file_lines(HANDBOOK);
    assert_eq!(chunks[2].text, lines[6..12].join("\n"));
}

#[test]
fn headings_start_chunks_and_carry_their_path() {
    let chunks = chunk(HANDBOOK, Format::Markdown, opts(256, 32));
    let lines = file_lines(HANDBOOK);
    // Every heading line opens a chunk, except one with nothing under it
    // before the next heading ("## Leave" under "# Handbook"): that heading
    // opens the next section's chunk.
    for no in [3, 7, 14, 23, 29] {
        assert!(lines[no - 1].starts_with(['#', 'S']));
        assert!(
            chunks.iter().any(|c| c.first_line == no),
            "line {no} opens no chunk"
        );
    }
    assert!(lines[24].starts_with("## Leave"));
    let leave = chunks
        .iter()
        .find(|c| c.text.contains("Twenty-five"))
        .unwrap();
    assert!(
        leave.text.starts_with("# Handbook\n\n## Leave"),
        "{:?}",
        leave.text
    );
    assert_eq!(
        leave.embedding_text(),
        format!("Handbook > Leave\n{}", leave.text)
    );
    // A `#` line in a code fence is not a heading.
    let fence = chunks
        .iter()
        .find(|c| c.text.contains("shell comment"))
        .unwrap();
    assert_eq!(fence.heading, "Policies > Expenses");
    // With a small budget sections still never share a chunk.
    let o = opts(8, 2);
    for c in chunk(HANDBOOK, Format::Markdown, o) {
        let sections = chunks
            .iter()
            .filter(|s| s.first_line <= c.last_line && c.first_line <= s.last_line)
            .count();
        assert_eq!(sections, 1, "{c:?} spans sections");
    }
}

#[test]
fn small_paragraphs_are_packed_and_cut_between_paragraphs() {
    let paras: Vec<String> = (0..12).map(|p| sentences(&format!("p{p}"), 1, 5)).collect();
    let text = paras.join("\n\n") + "\n";
    let o = opts(17, 4);
    let chunks = chunk(&text, Format::Text, o);
    let overlaps = check_all(&text, &chunks, o);
    // 5-word paragraphs in 17-token chunks: three to a chunk, cut only between
    // paragraphs, and nothing repeated.
    assert_eq!(chunks.len(), 4, "{chunks:#?}");
    for (c, overlap) in chunks.iter().zip(&overlaps) {
        assert_eq!(words(&c.text), 15);
        assert_eq!(c.last_line - c.first_line, 4, "{c:?}");
        assert_eq!(*overlap, 0);
    }
}

#[test]
fn a_long_paragraph_is_split_at_sentences_with_overlap() {
    let para = sentences("s", 30, 7);
    let text = format!("# Notes\n\n{para}\n\nA short closing paragraph.\n");
    let o = opts(40, 10);
    let chunks = chunk(&text, Format::Markdown, o);
    let overlaps = check_all(&text, &chunks, o);
    assert!(chunks.len() >= 6, "{}", chunks.len());
    for (n, c) in chunks.iter().enumerate() {
        assert_eq!(c.heading, "Notes");
        // The heading counts against the budget.
        assert!(words(&c.text) < 40);
        // Cut after a sentence ...
        assert!(
            c.text.ends_with('.'),
            "chunk {n} ends mid-sentence: {:?}",
            c.text
        );
        if n > 0 {
            // ... and the next chunk repeats the last sentence (7 ≤ 10 words).
            assert_eq!(overlaps[n], 7, "chunk {n}");
            assert!(
                c.text.starts_with('s') && c.text.contains("w0 "),
                "{:?}",
                c.text
            );
        }
    }
    // The paragraph's tail is packed with the short one after it.
    assert!(chunks
        .last()
        .unwrap()
        .text
        .ends_with("s29w6.\n\nA short closing paragraph."));
}

#[test]
fn a_paragraph_without_sentence_ends_is_cut_between_words() {
    let para: Vec<String> = (0..100).map(|k| format!("w{k}")).collect();
    let text = para.join(" ");
    let o = opts(20, 5);
    let chunks = chunk(&text, Format::Text, o);
    let overlaps = check_all(&text, &chunks, o);
    assert!(chunks
        .iter()
        .all(|c| words(&c.text) == 20 || c.text.ends_with("w99")));
    assert!(overlaps[1..].iter().all(|&v| v == 5), "{overlaps:?}");
}

#[test]
fn a_word_longer_than_the_budget_is_cut_between_characters() {
    // One token per character: a 100-character "word" cannot fit in 30.
    let chars = |s: &str| s.chars().filter(|c| !c.is_whitespace()).count();
    let long: String = (0..100)
        .map(|k| char::from(b'a' + (k % 26) as u8))
        .collect();
    let text = format!("short start\n{long}\nshort end\n");
    let o = opts(30, 5);
    let chunks = chunk_text("doc", &text, Format::Text, &o, &chars).unwrap();
    check_lines(&text, &chunks, o, &chars);
    let pieces: String = chunks
        .iter()
        .filter(|c| c.first_line == 2)
        .map(|c| c.text.as_str())
        .collect();
    assert_eq!(pieces, long);
    // Text without spaces (Chinese) is cut after its full stops first.
    let zh = "这是第一句。这是第二句，比较长一些。第三句在这里。".repeat(4);
    let chunks = chunk_text("zh", &zh, Format::Text, &opts(30, 5), &chars).unwrap();
    assert!(chunks.len() > 1);
    for c in &chunks[..chunks.len() - 1] {
        assert!(c.text.ends_with('。'), "{:?}", c.text);
    }
}

const HTML: &str = "<!DOCTYPE html>
<html><head>
<title>Fish &amp; Chips</title>
<style>
p { color: red; }
</style>
<script type=\"text/javascript\">
  var s = '<p>not text</p>';
</script>
</head>
<body>
<h1>Menu</h1>
<p>Cod &amp; haddock, 3 &lt; 4 &gt; 2,
&quot;fresh&quot; daily &#8211; it&#39;s&nbsp;true &#x41;&#66;.</p>
<!-- a comment
that spans lines -->
<h2 class=\"x\">Opening <em>hours</em></h2>
<p>Monday to <b>Friday</b>.</p><p>Closed on Sunday.</p>
<div
  class=\"multi-line tag\">Last line.</div>
</body></html>
";

#[test]
fn html_is_stripped_with_line_numbers_kept() {
    let o = opts(256, 32);
    let chunks = chunk(HTML, Format::Html, o);
    let all: String = chunks
        .iter()
        .map(|c| c.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for gone in [
        "<p",
        "</",
        "<!",
        "color",
        "not text",
        "var s",
        "comment",
        "spans lines",
        "class",
        "&amp;",
        "&lt;",
        "&#",
        "\r",
    ] {
        assert!(!all.contains(gone), "{gone:?} left in {all:?}");
    }
    let ranges: Vec<(usize, usize, &str, &str)> = chunks
        .iter()
        .map(|c| {
            (
                c.first_line,
                c.last_line,
                c.heading.as_str(),
                c.text.as_str(),
            )
        })
        .collect();
    assert_eq!(
        ranges,
        [
            (3, 3, "", "Fish & Chips"),
            (
                12,
                14,
                "Menu",
                "Menu\nCod & haddock, 3 < 4 > 2,\n\"fresh\" daily – it's true AB."
            ),
            (
                17,
                20,
                "Menu > Opening hours",
                "Opening hours\nMonday to Friday. Closed on Sunday.\n\nLast line."
            ),
        ]
    );
    // The line numbers are the file's: the text is on those lines.
    let lines: Vec<&str> = HTML.lines().collect();
    assert!(lines[12].starts_with("<p>Cod &amp; haddock"));
    assert!(lines[19].contains("Last line."));
}

#[test]
fn html_paragraphs_break_at_block_tags() {
    // No blank lines: each <p> line is its own paragraph, so a small budget
    // cuts between them and repeats nothing.
    let html: String = (0..6)
        .map(|p| format!("<p>{}</p>\n", sentences(&format!("p{p}"), 1, 6)))
        .collect();
    let chunks = chunk(&html, Format::Html, opts(14, 4));
    assert_eq!(chunks.len(), 3, "{chunks:#?}");
    for (n, c) in chunks.iter().enumerate() {
        assert_eq!((c.first_line, c.last_line), (2 * n + 1, 2 * n + 2));
        assert_eq!(words(&c.text), 12);
    }
}

#[test]
fn crlf_files_give_the_same_chunks() {
    let crlf = HANDBOOK.replace('\n', "\r\n");
    for o in [opts(256, 32), opts(7, 2)] {
        let lf = chunk(HANDBOOK, Format::Markdown, o);
        let cr = chunk(&crlf, Format::Markdown, o);
        assert_eq!(lf, cr);
        assert!(cr.iter().all(|c| !c.text.contains('\r')));
    }
    let html = HTML.replace('\n', "\r\n");
    assert_eq!(
        chunk(HTML, Format::Html, opts(256, 32)),
        chunk(&html, Format::Html, opts(256, 32))
    );
}

/// Random documents of every kind of line, cut with random budgets: the
/// invariants hold and nothing panics.
#[test]
fn random_documents_keep_the_invariants() {
    let mut rng = common::seeded_rng("ENGINE_CHUNK_SEED");
    for _ in 0..200 {
        let mut lines: Vec<String> = Vec::new();
        for _ in 0..rng.random_range(0..40) {
            let line = match rng.random_range(0..10) {
                0 | 1 => String::new(),
                2 => format!(
                    "{} Heading {}",
                    "#".repeat(rng.random_range(1..=4)),
                    lines.len()
                ),
                3 => "```".into(),
                4 => "   ".into(),
                _ => (0..rng.random_range(1..30))
                    .map(|k| {
                        let end = [".", "", "", "!", ","][rng.random_range(0..5)];
                        format!("l{}w{k}{end}", lines.len())
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            lines.push(line);
        }
        let sep = if rng.random_bool(0.3) { "\r\n" } else { "\n" };
        let text = lines.join(sep);
        let max = rng.random_range(2..40);
        let o = opts(max, rng.random_range(0..=max / 2));
        let format = if rng.random_bool(0.5) {
            Format::Markdown
        } else {
            Format::Text
        };
        let chunks = chunk(&text, format, o);
        // Shown only when the test fails.
        println!("{format:?} {o:?}\n{text:?}\n{chunks:#?}");
        check_lines(&text, &chunks, o, &words);
        // Heading lines are text too: every word of the document is in order.
        check_coverage(&text, &chunks);
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn file_err(path: &Path) -> Error {
    chunk_file(path, &ChunkOptions::default(), &words).unwrap_err()
}

#[test]
fn files_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.md", "b.MARKDOWN"] {
        let path = write(dir.path(), name, HANDBOOK.as_bytes());
        let chunks = chunk_file(&path, &ChunkOptions::default(), &words).unwrap();
        assert_eq!(
            chunks,
            chunk_text(
                &path.display().to_string(),
                HANDBOOK,
                Format::Markdown,
                &ChunkOptions::default(),
                &words
            )
            .unwrap()
        );
        assert!(chunks
            .iter()
            .all(|c| c.source == path.display().to_string()));
    }
    // In plain text a `#` line is just a line.
    for name in ["notes", "notes.txt", "notes.text"] {
        let path = write(dir.path(), name, HANDBOOK.as_bytes());
        let chunks = chunk_file(&path, &ChunkOptions::default(), &words).unwrap();
        assert!(chunks.iter().all(|c| c.heading.is_empty()), "{name}");
    }
    let path = write(dir.path(), "page.htm", HTML.as_bytes());
    let chunks = chunk_file(&path, &ChunkOptions::default(), &words).unwrap();
    assert_eq!(chunks[1].heading, "Menu");
    // A UTF-8 byte-order mark is not text and does not shift the lines.
    let path = write(
        dir.path(),
        "bom.md",
        &[b"\xEF\xBB\xBF".as_slice(), HANDBOOK.as_bytes()].concat(),
    );
    let chunks = chunk_file(&path, &ChunkOptions::default(), &words).unwrap();
    assert_eq!(
        chunks[0].text,
        "Quillmark employee handbook, kept by People Ops."
    );
    assert_eq!(chunks[1].first_line, 3);
}

#[test]
fn bad_files_give_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let one_line = |e: &Error| {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        msg
    };

    let path = write(
        dir.path(),
        "image.txt",
        b"GIF89a\x01\x00\x00\x00 some bytes",
    );
    let e = file_err(&path);
    assert!(matches!(e, Error::Format { .. }), "{e:?}");
    let msg = one_line(&e);
    assert!(msg.contains("image.txt") && msg.contains("binary"), "{msg}");

    let path = write(dir.path(), "latin1.md", b"line one\ncaf\xe9\n");
    let msg = one_line(&file_err(&path));
    assert!(
        msg.contains("latin1.md") && msg.contains("UTF-8") && msg.contains("line 2"),
        "{msg}"
    );

    let path = write(dir.path(), "wide.txt", b"\xFF\xFEh\x00i\x00");
    let msg = one_line(&file_err(&path));
    assert!(msg.contains("wide.txt") && msg.contains("UTF-16"), "{msg}");

    let missing = dir.path().join("missing.md");
    let e = file_err(&missing);
    assert!(
        matches!(&e, Error::Io { path, .. } if path == &missing),
        "{e:?}"
    );
    assert!(one_line(&e).contains("missing.md"));

    let e = file_err(dir.path());
    assert!(matches!(e, Error::Io { .. }), "a folder: {e:?}");

    let path = write(dir.path(), "slides.pdf", b"%PDF-1.7");
    let e = file_err(&path);
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert!(one_line(&e).contains("slides.pdf"));
}

#[test]
fn empty_files_give_no_chunks() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("empty.txt", b"".as_slice()),
        ("blank.md", b"\n  \n\t\r\n\n".as_slice()),
        ("bom.md", b"\xEF\xBB\xBF".as_slice()),
        (
            "tags.html",
            b"<html>\n<body><script>x = 1;</script></body>\n</html>\n".as_slice(),
        ),
    ] {
        let path = write(dir.path(), name, bytes);
        let chunks = chunk_file(&path, &ChunkOptions::default(), &words).unwrap();
        assert!(chunks.is_empty(), "{name}: {chunks:?}");
    }
}

#[test]
fn bad_options_are_refused() {
    let e = chunk_text("doc", "text", Format::Text, &opts(10, 6), &words).unwrap_err();
    assert!(
        matches!(e, Error::Invalid(_)) && e.to_string().contains("overlap"),
        "{e}"
    );
    let plus_two = |s: &str| words(s) + 2;
    let e = chunk_text("doc", "text", Format::Text, &opts(2, 0), &plus_two).unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");
}

/// all-MiniLM-L6-v2's tokenizer.json, with its truncation and padding (to
/// 128) cleared so that it counts every token; `None` (skipped) when
/// models/fetch.sh has not been run, unless ENGINE_REQUIRE_MODELS=1.
fn minilm_tokenizer() -> Option<tokenizers::Tokenizer> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2");
    if !dir.join("tokenizer.json").exists() {
        if std::env::var("ENGINE_REQUIRE_MODELS").as_deref() == Ok("1") {
            panic!("{} is missing: run models/fetch.sh", dir.display());
        }
        eprintln!(
            "skipped: {} is missing (run models/fetch.sh)",
            dir.display()
        );
        return None;
    }
    // Through the project's wrapper first: it loads.
    engine::tokenizer::Tokenizer::load(&dir).unwrap();
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // As shipped, it truncates and pads: counting refuses it.
    let e = TokenCounter::count(&tok, "hello").unwrap_err();
    assert!(e.to_string().contains("truncation"), "{e}");
    tok.with_truncation(None).unwrap().with_padding(None);
    Some(tok)
}

#[test]
fn real_tokenizer_budget_on_the_example_knowledge_base() {
    let Some(tok) = minilm_tokenizer() else {
        return;
    };
    assert_eq!(
        TokenCounter::count(&tok, "hello world").unwrap(),
        4,
        "[CLS] hello world [SEP]"
    );
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quillmark-kb/docs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&docs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for o in [ChunkOptions::default(), opts(48, 12)] {
        let mut total = 0;
        for path in &files {
            let chunks = chunk_file(path, &o, &tok).unwrap();
            assert!(!chunks.is_empty(), "{}", path.display());
            total += chunks.len();
            let original = std::fs::read_to_string(path).unwrap();
            let lines = file_lines(&original);
            for c in &chunks {
                assert!(c.tokens <= o.max_tokens, "{c:?}");
                assert_eq!(
                    c.tokens,
                    tok.encode(c.embedding_text(), true).unwrap().len()
                );
                // The chunk's first and last words are on its first and last lines.
                let first = c.text.split_whitespace().next().unwrap();
                let last = c.text.split_whitespace().last().unwrap();
                if path.extension().unwrap() != "html" {
                    assert!(lines[c.first_line - 1].contains(first), "{c:?}");
                    assert!(lines[c.last_line - 1].contains(last), "{c:?}");
                }
            }
        }
        eprintln!("{} chunks at {} tokens", total, o.max_tokens);
    }
    // A long document with the default budget: split, with overlap.
    let long = format!("# Long\n\n{}\n", sentences("t", 200, 9));
    let o = ChunkOptions::default();
    let chunks = chunk_text("long", &long, Format::Markdown, &o, &tok).unwrap();
    assert!(chunks.len() > 3);
    for pair in chunks.windows(2) {
        assert!(
            pair[0].tokens <= 256 && pair[0].tokens > 128,
            "{}",
            pair[0].tokens
        );
        // The next chunk starts with words from the end of this one.
        let head: String = pair[1]
            .text
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(pair[0].text.contains(&head), "no overlap: {head:?}");
    }
}

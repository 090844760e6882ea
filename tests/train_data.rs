//! Fine-tuning data: JSONL formats → ids and targets, bad lines, padding and
//! packing, shuffling and resume, and the learning-rate schedule.

mod common;

use engine::tokenizer::{Message, Tokenizer};
use engine::train::data::{encode_record, eos_id, Record};
use engine::train::{
    total_steps, Batch, BatchConfig, DataPosition, Dataset, Decay, Example, Layout, Length, Loader,
    Schedule, IGNORE,
};
use engine::Error;
use std::path::{Path, PathBuf};

const I: u32 = IGNORE;

/// A hand-written chat template for the tiny word-level tokenizer (words
/// w0..w319 split on whitespace): BOS w1, a role word (system w5, user w3,
/// assistant w4), the content, EOS w2 after every turn.
const TINY_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %} \
{% if m.role == 'system' %}w5{% elif m.role == 'user' %}w3{% else %}w4{% endif %} \
{{ m.content }} {{ eos_token }}{% endfor %}{% if add_generation_prompt %} w4{% endif %}";

/// The tiny test tokenizer with [`TINY_TEMPLATE`], in a temporary folder.
fn tiny() -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama");
    std::fs::copy(
        root.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let cfg = serde_json::json!({
        "bos_token": "w1",
        "eos_token": "w2",
        "chat_template": TINY_TEMPLATE,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = Tokenizer::load(dir.path()).unwrap();
    (dir, tok)
}

fn smollm2() -> Option<PathBuf> {
    common::real_model(
        "smollm2-135m-instruct",
        &["tokenizer_config.json", "tokenizer.json"],
    )
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

fn load_str(dir: &Path, tok: &Tokenizer, text: &str) -> engine::Result<Dataset> {
    let path = dir.join("data.jsonl");
    std::fs::write(&path, text).unwrap();
    Dataset::load(&path, tok, 2)
}

// ---------------------------------------------------------------- formats

#[test]
fn text_has_loss_everywhere_and_ends_with_eos() {
    let (_d, tok) = tiny();
    let ex = encode_record(&Record::Text("w10 w11 w12".into()), &tok, 2).unwrap();
    assert_eq!(ex.ids, [10, 11, 12, 2]);
    assert_eq!(ex.targets, [11, 12, 2, I]);
    assert_eq!(ex.loss_tokens(), 3);
}

#[test]
fn prompt_completion_has_loss_on_completion_only() {
    let (_d, tok) = tiny();
    let rec = Record::PromptCompletion {
        prompt: "w10 w11".into(),
        completion: "w12 w13".into(),
    };
    let ex = encode_record(&rec, &tok, 2).unwrap();
    assert_eq!(ex.ids, [10, 11, 12, 13, 2]);
    // Position 1 (the prompt's last token) predicts the first completion token.
    assert_eq!(ex.targets, [I, 12, 13, 2, I]);
}

#[test]
fn messages_have_loss_on_assistant_turns_only() {
    let (_d, tok) = tiny();
    let rec = Record::Messages(vec![
        msg("system", "w20"),
        msg("user", "w10 w11"),
        msg("assistant", "w12 w13"),
        msg("user", "w14"),
        msg("assistant", "w15"),
    ]);
    let ex = encode_record(&rec, &tok, 2).unwrap();
    //                 BOS sys     EOS usr           EOS ast             EOS usr     EOS ast     EOS
    assert_eq!(
        ex.ids,
        [1, 5, 20, 2, 3, 10, 11, 2, 4, 12, 13, 2, 3, 14, 2, 4, 15, 2]
    );
    let mut want = vec![I; 18];
    want[8] = 12; // the assistant opener predicts the first answer token
    want[9] = 13;
    want[10] = 2; // the turn's end marker is learnt
    want[15] = 15;
    want[16] = 2;
    assert_eq!(ex.targets, want);
}

#[test]
fn load_reads_every_shape_and_skips_blank_lines() {
    let (d, tok) = tiny();
    let text = "{\"text\": \"w10 w11\"}\n\n   \r\n\
                {\"prompt\": \"w10\", \"completion\": \"w12\", \"id\": 7}\r\n\
                {\"messages\": [{\"role\": \"user\", \"content\": \"w10\"}, {\"role\": \"assistant\", \"content\": \"w11\"}]}\n";
    let data = load_str(d.path(), &tok, text).unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data.examples[0].ids, [10, 11, 2]);
    assert_eq!(data.examples[1].ids, [10, 12, 2]);
    assert_eq!(data.examples[1].targets, [12, 2, I]);
    assert_eq!(data.examples[2].ids, [1, 3, 10, 2, 4, 11, 2]);
    assert_eq!(data.examples[2].targets, [I, I, I, I, 11, 2, I]);
    assert_eq!(data.loss_tokens(), 2 + 2 + 2);
}

#[test]
fn eos_id_comes_from_the_model_folder() {
    let (d, tok) = tiny();
    assert_eq!(eos_id(d.path(), &tok).unwrap(), 2);
    // Without tokenizer_config.json: config.json's eos_token_id.
    let bare = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama");
    std::fs::copy(
        root.join("model/config.json"),
        bare.path().join("config.json"),
    )
    .unwrap();
    assert_eq!(eos_id(bare.path(), &tok).unwrap(), 2);
    let empty = tempfile::tempdir().unwrap();
    assert!(eos_id(empty.path(), &tok).is_err());
}

// ---------------------------------------------------------------- SmolLM2 ChatML

#[test]
fn smollm2_chat_template_trains_assistant_tokens_and_im_end() {
    let Some(dir) = smollm2() else { return };
    let tok = Tokenizer::load(&dir).unwrap();
    let eos = eos_id(&dir, &tok).unwrap();
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(eos, im_end);
    let messages = vec![
        msg("user", "What is the capital of France?"),
        msg("assistant", "Paris, of course."),
        msg("user", "And of Italy?"),
        msg("assistant", "Rome.\nIt is also the largest city."),
    ];
    let ex = encode_record(&Record::Messages(messages.clone()), &tok, eos).unwrap();

    // The split tokenization agrees with tokenizing the whole rendering.
    let full = tok.apply_chat_template(&messages, false).unwrap();
    assert_eq!(ex.ids, tok.encode(&full, false).unwrap());

    // The runs of trained targets are exactly each answer followed by <|im_end|>.
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev_ignored = true;
    for &t in &ex.targets {
        if t != IGNORE {
            if prev_ignored {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(t);
        }
        prev_ignored = t == IGNORE;
    }
    let want = |a: &str| tok.encode(&format!("{a}<|im_end|>"), false).unwrap();
    assert_eq!(
        runs,
        [
            want("Paris, of course."),
            want("Rome.\nIt is also the largest city.")
        ]
    );
    assert_eq!(*runs[0].last().unwrap(), im_end);

    // The first trained position is the end of the generation prompt, as at
    // inference: the ids before it are the prompt's own tokenization.
    let prompt = tok.apply_chat_template(&messages[..1], true).unwrap();
    let prompt_ids = tok.encode(&prompt, false).unwrap();
    let first = ex.targets.iter().position(|&t| t != IGNORE).unwrap();
    assert_eq!(first + 1, prompt_ids.len());
    assert_eq!(ex.ids[..prompt_ids.len()], prompt_ids[..]);

    // The "\n" after each <|im_end|> is not trained: the last target is IGNORE
    // and the <|im_end|> position predicts nothing.
    let last_end = ex.ids.iter().rposition(|&i| i == im_end).unwrap();
    assert_eq!(ex.targets[last_end], IGNORE);
    assert_eq!(ex.targets[last_end - 1], im_end);
}

// ---------------------------------------------------------------- bad input

#[test]
fn every_bad_line_names_file_and_line() {
    let (d, tok) = tiny();
    let cases = [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("\"w10\"", "expected a JSON object"),
        ("{\"foo\": \"w10\"}", "unknown shape"),
        ("{\"text\": \"w10\", \"messages\": []}", "ambiguous"),
        ("{\"text\": \"\"}", "empty \"text\""),
        ("{\"text\": \"   \"}", "empty \"text\""),
        ("{\"text\": 5}", "\"text\" must be a string"),
        ("{\"prompt\": \"w10\"}", "missing field \"completion\""),
        ("{\"completion\": \"w10\"}", "missing field \"prompt\""),
        ("{\"prompt\": \"w10\", \"completion\": null}", "\"completion\" must be a string"),
        ("{\"messages\": \"hi\"}", "\"messages\" must be a list"),
        ("{\"messages\": []}", "empty \"messages\""),
        ("{\"messages\": [\"w10\"]}", "message 1: expected"),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"w1\"}, {\"role\": \"bot\", \"content\": \"w1\"}]}",
            "message 2: unknown role \"bot\"",
        ),
        ("{\"messages\": [{\"role\": \"user\"}]}", "message 1: missing field \"content\""),
        ("{\"messages\": [{\"role\": 1, \"content\": \"w1\"}]}", "message 1: \"role\" must be a string"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"w1\"}]}", "no assistant message"),
    ];
    for (bad, why) in cases {
        let text = format!("{{\"text\": \"w10 w11\"}}\n\n{bad}\n{{\"text\": \"w12\"}}\n");
        let err = load_str(d.path(), &tok, &text).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{bad}: {err:?}");
        let shown = err.to_string();
        assert!(shown.contains("data.jsonl: line 3: "), "{bad}: {shown}");
        assert!(shown.contains(why), "{bad}: want {why:?} in {shown}");
        assert!(!shown.contains('\n'), "one line: {shown}");
    }
    // Invalid UTF-8 is a bad line too.
    let path = d.path().join("data.jsonl");
    std::fs::write(&path, b"{\"text\": \"w10\"}\n{\"text\": \"\xff\"}\n").unwrap();
    let err = Dataset::load(&path, &tok, 2).unwrap_err().to_string();
    assert!(err.contains("line 2: not UTF-8"), "{err}");
}

#[test]
fn empty_dataset_is_an_error() {
    let (d, tok) = tiny();
    for text in ["", "\n", "  \n\r\n\t\n"] {
        let err = load_str(d.path(), &tok, text).unwrap_err().to_string();
        assert!(err.contains("data.jsonl") && err.contains("empty"), "{err}");
    }
    let err = Dataset::load(&d.path().join("absent.jsonl"), &tok, 2).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}

// ---------------------------------------------------------------- batching

/// Example k: tokens 1000(k+1) + j, j = 0..len; some end with EOS (2), some
/// don't; the first `prompt` tokens carry no loss.
fn synthetic(lens: &[(usize, usize, bool)]) -> Dataset {
    let examples = lens
        .iter()
        .enumerate()
        .map(|(k, &(len, prompt, eos))| {
            let mut ids: Vec<u32> = (0..len as u32).map(|j| 1000 * (k as u32 + 1) + j).collect();
            if eos {
                ids.push(2);
            }
            let loss: Vec<bool> = (0..ids.len()).map(|j| j >= prompt).collect();
            Example::from_loss_flags(ids, &loss)
        })
        .collect();
    Dataset {
        path: PathBuf::from("synthetic.jsonl"),
        examples,
        eos_id: 2,
    }
}

fn config(layout: Layout, batch_size: usize, seq_len: usize, seed: u64) -> BatchConfig {
    BatchConfig {
        batch_size,
        seq_len,
        layout,
        shuffle: true,
        seed,
        pad_id: 0,
    }
}

fn lengths(n: usize) -> Vec<(usize, usize, bool)> {
    (0..n)
        .map(|k| (1 + (k * 7) % 11, k % 3, k % 2 == 0))
        .collect()
}

#[test]
fn padding_truncates_and_ignores_pad_positions() {
    let (d, tok) = tiny();
    let text = "{\"text\": \"w10 w11 w12\"}\n{\"text\": \"w10 w11 w12 w13 w14 w15 w16 w17\"}\n{\"prompt\": \"w20\", \"completion\": \"w21\"}\n";
    let data = load_str(d.path(), &tok, text).unwrap();
    let mut cfg = config(Layout::Pad, 2, 6, 0);
    cfg.shuffle = false;
    let mut loader = Loader::new(data, cfg).unwrap();
    assert_eq!(loader.batches_per_epoch(), 2);
    let b = loader.next_batch();
    assert_eq!((b.rows, b.seq_len), (2, 6));
    assert_eq!(b.row_ids(0), [10, 11, 12, 2, 0, 0]);
    assert_eq!(b.row_targets(0), [11, 12, 2, I, I, I]);
    // Truncated to 6: the last kept position still predicts its next token.
    assert_eq!(b.row_ids(1), [10, 11, 12, 13, 14, 15]);
    assert_eq!(b.row_targets(1), [11, 12, 13, 14, 15, 16]);
    let b = loader.next_batch();
    assert_eq!(b.rows, 1, "the epoch's last batch has the remaining row");
    assert_eq!(b.ids, [20, 21, 2, 0, 0, 0]);
    assert_eq!(b.targets, [21, 2, I, I, I, I]);
    assert_eq!(loader.position(), DataPosition { epoch: 0, batch: 2 });
    loader.next_batch();
    assert_eq!(loader.position(), DataPosition { epoch: 1, batch: 1 });
}

/// The rows of one epoch, concatenated.
fn epoch_stream(loader: &mut Loader) -> (Vec<u32>, Vec<u32>) {
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    for _ in 0..loader.batches_per_epoch() {
        let b = loader.next_batch();
        assert_eq!(b.ids.len(), b.rows * b.seq_len);
        ids.extend(b.ids);
        targets.extend(b.targets);
    }
    (ids, targets)
}

#[test]
fn packing_fills_rows_and_never_crosses_examples() {
    let data = synthetic(&lengths(23));
    let want_loss = data.loss_tokens();
    for seq_len in [2, 5, 7, 16, 64] {
        let mut loader = Loader::new(data.clone(), config(Layout::Pack, 3, seq_len, 9)).unwrap();
        for epoch in 0..2u64 {
            let order = loader.epoch_order(epoch);
            let (ids, targets) = epoch_stream(&mut loader);
            // The stream is the examples in epoch order, each followed by an
            // EOS unless it has one, then padding to a whole row.
            let mut want = Vec::new();
            for &k in &order {
                let ex = &data.examples[k];
                want.extend_from_slice(&ex.ids);
                if ex.ids.last() != Some(&2) {
                    want.push(2);
                }
            }
            assert_eq!(ids.len(), want.len().div_ceil(seq_len) * seq_len);
            assert_eq!(ids[..want.len()], want[..]);
            assert!(ids[want.len()..].iter().all(|&i| i == 0));
            assert!(targets[want.len()..].iter().all(|&t| t == IGNORE));
            // Every target is the next token of the same example.
            let doc = |id: u32| id / 1000;
            for p in 0..ids.len() {
                let t = targets[p];
                if t == IGNORE {
                    continue;
                }
                assert_eq!(t, ids[p + 1], "seq_len {seq_len} position {p}");
                assert_ne!(ids[p], 2, "an EOS predicts the next example");
                assert!(t == 2 || doc(t) == doc(ids[p]), "crosses at {p}");
            }
            let loss = targets.iter().filter(|&&t| t != IGNORE).count();
            assert_eq!(loss, want_loss, "packing keeps exactly the trained tokens");
        }
    }
}

#[test]
fn shuffling_is_reproducible_and_differs_across_epochs() {
    let data = synthetic(&lengths(40));
    for layout in [Layout::Pad, Layout::Pack] {
        let mut a = Loader::new(data.clone(), config(layout, 4, 8, 42)).unwrap();
        let mut b = Loader::new(data.clone(), config(layout, 4, 8, 42)).unwrap();
        let mut c = Loader::new(data.clone(), config(layout, 4, 8, 43)).unwrap();
        let ea: Vec<Batch> = (0..a.batches_per_epoch()).map(|_| a.next_batch()).collect();
        let eb: Vec<Batch> = (0..b.batches_per_epoch()).map(|_| b.next_batch()).collect();
        let ec: Vec<Batch> = (0..c.batches_per_epoch()).map(|_| c.next_batch()).collect();
        assert_eq!(ea, eb, "same seed, same batches");
        assert_ne!(ea, ec, "another seed, another order");
        let a1: Vec<Batch> = (0..a.batches_per_epoch()).map(|_| a.next_batch()).collect();
        assert_eq!(a1.len(), ea.len());
        assert_ne!(ea, a1, "each epoch has its own order");
    }
    let loader = Loader::new(data.clone(), config(Layout::Pad, 4, 8, 42)).unwrap();
    for epoch in 0..3 {
        let mut order = loader.epoch_order(epoch);
        order.sort_unstable();
        assert_eq!(
            order,
            (0..40).collect::<Vec<_>>(),
            "each example once per epoch"
        );
    }
    assert_ne!(loader.epoch_order(0), loader.epoch_order(1));
    let mut fixed = config(Layout::Pad, 4, 8, 42);
    fixed.shuffle = false;
    let loader = Loader::new(data, fixed).unwrap();
    assert_eq!(loader.epoch_order(5), (0..40).collect::<Vec<_>>());
}

#[test]
fn resume_from_a_saved_position_gives_the_same_batches() {
    let data = synthetic(&lengths(17));
    for layout in [Layout::Pad, Layout::Pack] {
        let cfg = config(layout, 3, 6, 7);
        let mut run = Loader::new(data.clone(), cfg.clone()).unwrap();
        let bpe = run.batches_per_epoch();
        for stop in [0, 1, bpe - 1, bpe, bpe + 2, 3 * bpe] {
            let mut first = Loader::new(data.clone(), cfg.clone()).unwrap();
            for _ in 0..stop {
                first.next_batch();
            }
            let saved = serde_json::to_string(&first.position()).unwrap();
            let pos: DataPosition = serde_json::from_str(&saved).unwrap();
            assert_eq!(pos, first.position());
            let mut resumed = Loader::new(data.clone(), cfg.clone()).unwrap();
            resumed.seek(pos).unwrap();
            for i in 0..2 * bpe + 1 {
                assert_eq!(
                    first.next_batch(),
                    resumed.next_batch(),
                    "{layout:?} stop {stop} batch {i}"
                );
                assert_eq!(first.position(), resumed.position());
            }
        }
        // An uninterrupted run agrees with a fresh loader sought to its start.
        let b0 = run.next_batch();
        let mut again = Loader::new(data.clone(), cfg.clone()).unwrap();
        again.seek(DataPosition::default()).unwrap();
        assert_eq!(b0, again.next_batch());
        let err = again
            .seek(DataPosition {
                epoch: 0,
                batch: bpe + 1,
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("data position"), "{err}");
    }
}

#[test]
fn loader_rejects_bad_sizes() {
    let data = synthetic(&lengths(3));
    assert!(Loader::new(data.clone(), config(Layout::Pad, 0, 8, 0)).is_err());
    assert!(Loader::new(data.clone(), config(Layout::Pack, 2, 1, 0)).is_err());
    let empty = Dataset {
        examples: vec![],
        ..data
    };
    assert!(Loader::new(empty, config(Layout::Pad, 2, 8, 0)).is_err());
}

// ---------------------------------------------------------------- schedule

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1e-3)
}

#[test]
fn cosine_schedule_warmup_middle_and_end() {
    let s = Schedule::new(1e-3, 0.0, 10, 110, Decay::Cosine).unwrap();
    assert!(close(s.lr_at(0), 1e-4), "first warmup step: {}", s.lr_at(0));
    assert!(close(s.lr_at(4), 5e-4));
    assert!(close(s.lr_at(9), 1e-3), "warmup ends at the peak");
    assert!(close(s.lr_at(10), 1e-3), "decay starts at the peak");
    assert!(close(s.lr_at(60), 5e-4), "halfway down: {}", s.lr_at(60));
    assert!(close(
        s.lr_at(35),
        1e-3 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())
    ));
    assert!(s.lr_at(109) > 0.0 && s.lr_at(109) < 1e-6);
    assert_eq!(s.lr_at(110), 0.0);
    assert_eq!(s.lr_at(1000), 0.0);
    for step in 10..110 {
        assert!(s.lr_at(step + 1) <= s.lr_at(step), "monotone after warmup");
    }
    let floor = Schedule::new(1e-3, 1e-4, 10, 110, Decay::Cosine).unwrap();
    assert!(close(floor.lr_at(60), 5.5e-4));
    assert!(close(floor.lr_at(110), 1e-4));
}

#[test]
fn linear_and_constant_schedules() {
    let s = Schedule::new(2e-4, 0.0, 0, 100, Decay::Linear).unwrap();
    assert!(close(s.lr_at(0), 2e-4), "no warmup: the peak at once");
    assert!(close(s.lr_at(25), 1.5e-4));
    assert!(close(s.lr_at(50), 1e-4));
    assert_eq!(s.lr_at(100), 0.0);
    let c = Schedule::new(2e-4, 0.0, 4, 100, Decay::Constant).unwrap();
    assert!(close(c.lr_at(1), 1e-4));
    assert!(close(c.lr_at(4), 2e-4) && close(c.lr_at(99), 2e-4));
}

#[test]
fn schedule_rejects_bad_values() {
    assert!(Schedule::new(0.0, 0.0, 0, 10, Decay::Cosine).is_err());
    assert!(Schedule::new(f64::NAN, 0.0, 0, 10, Decay::Cosine).is_err());
    assert!(Schedule::new(1e-3, 2e-3, 0, 10, Decay::Cosine).is_err());
    assert!(Schedule::new(1e-3, -1.0, 0, 10, Decay::Cosine).is_err());
    assert!(Schedule::new(1e-3, 0.0, 0, 0, Decay::Cosine).is_err());
    let err = Schedule::new(1e-3, 0.0, 11, 10, Decay::Cosine).unwrap_err();
    assert!(err.to_string().contains("--warmup 11"), "{err}");
    assert!(Schedule::new(1e-3, 0.0, 10, 10, Decay::Cosine).is_ok());
}

#[test]
fn total_optimizer_steps_with_accumulation() {
    assert_eq!(total_steps(Length::Steps(100), 7, 4).unwrap(), 100);
    // 2 epochs × 10 micro-batches = 20, in steps of 4 micro-batches.
    assert_eq!(total_steps(Length::Epochs(2.0), 10, 4).unwrap(), 5);
    // 3 × 10 = 30 micro-batches in steps of 4: 8 steps (the last reaches 2 into epoch 4).
    assert_eq!(total_steps(Length::Epochs(3.0), 10, 4).unwrap(), 8);
    assert_eq!(total_steps(Length::Epochs(1.0), 10, 1).unwrap(), 10);
    assert_eq!(total_steps(Length::Epochs(0.1), 30, 1).unwrap(), 3);
    assert_eq!(total_steps(Length::Epochs(0.5), 3, 1).unwrap(), 2);
    assert_eq!(total_steps(Length::Epochs(1.0), 1, 8).unwrap(), 1);
    assert!(total_steps(Length::Steps(0), 10, 1).is_err());
    assert!(total_steps(Length::Steps(10), 10, 0).is_err());
    assert!(total_steps(Length::Epochs(0.0), 10, 1).is_err());
    assert!(total_steps(Length::Epochs(f64::INFINITY), 10, 1).is_err());
    assert!(total_steps(Length::Epochs(1.0), 0, 1).is_err());
}

//! examples/cite trains an adapter on `engine ask`'s own prompt: every chat
//! of its training and eval sets must be exactly what `rag::answer::messages`
//! builds from the chat's passages and question, and its answer must cite a
//! passage it was given (or say it does not know). If answer.rs changes its
//! prompt, this fails until make_data.py follows.

use engine::rag::answer::{cited, messages, Passage};
use std::path::Path;

/// The passages and question of a user turn laid out as `messages` does:
/// "[n] (source)\ntext\n\n" per passage, then "Question: q".
fn parse_user(user: &str) -> (Vec<Passage>, String) {
    let (body, question) = user.rsplit_once("Question: ").expect("a question");
    let mut passages = Vec::new();
    for block in body.split("\n\n[").filter(|b| !b.is_empty()) {
        let block = block.strip_prefix('[').unwrap_or(block);
        let (head, text) = block.split_once('\n').expect("a passage's text");
        let (n, source) = head.split_once("] (").expect("[n] (source)");
        passages.push(Passage {
            n: n.parse().expect("a passage number"),
            source: source.trim_end_matches(')').to_string(),
            line_start: 1,
            line_end: 1,
            score: 0.0,
            text: text.trim().to_string(),
        });
    }
    (passages, question.to_string())
}

#[test]
fn cite_chats_are_asks_own_prompt() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cite");
    for file in ["train.jsonl", "eval.jsonl"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let mut count = 0;
        for (i, line) in text.lines().enumerate() {
            let chat: serde_json::Value = serde_json::from_str(line).unwrap();
            let turns = chat["messages"].as_array().unwrap();
            let content = |t: usize| turns[t]["content"].as_str().unwrap();
            let roles: Vec<&str> = turns.iter().map(|t| t["role"].as_str().unwrap()).collect();
            assert_eq!(roles, ["system", "user", "assistant"], "{file}:{}", i + 1);
            let (passages, question) = parse_user(content(1));
            assert!(!passages.is_empty(), "{file}:{}", i + 1);
            let want = messages(&question, &passages);
            assert_eq!(content(0), want[0].content, "{file}:{}: system", i + 1);
            assert_eq!(content(1), want[1].content, "{file}:{}: user", i + 1);
            let answer = content(2);
            assert!(
                !cited(answer, passages.len()).is_empty() || answer.contains("do not know"),
                "{file}:{}: {answer:?} cites no passage",
                i + 1
            );
            count += 1;
        }
        assert!(count >= 20, "{file}: {count} chats");
    }
}

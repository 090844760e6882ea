//! Answers that cite their sources: the retrieved chunks become numbered
//! passages in the prompt, the model is asked to cite them as [n], and the
//! citations are read back from its answer.

use crate::rag::index::Hit;
use crate::tokenizer::Message;

/// A retrieved chunk as the prompt numbers it (from 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Passage {
    pub n: usize,
    pub source: String,
    pub line_start: usize,
    pub line_end: usize,
    pub score: f32,
    pub text: String,
}

impl Passage {
    /// `path:first-last`, as citations print it.
    pub fn location(&self) -> String {
        format!("{}:{}-{}", self.source, self.line_start, self.line_end)
    }
}

/// Search hits, best first, as passages 1, 2, ….
pub fn passages(hits: Vec<Hit>) -> Vec<Passage> {
    hits.into_iter()
        .enumerate()
        .map(|(i, h)| Passage {
            n: i + 1,
            source: h.chunk.source,
            line_start: h.chunk.line_start,
            line_end: h.chunk.line_end,
            score: h.score,
            text: h.chunk.text,
        })
        .collect()
}

/// The chat: an instruction to answer from the passages only and cite them,
/// then the numbered passages and the question.
pub fn messages(question: &str, passages: &[Passage]) -> Vec<Message> {
    let system = "Answer the question using only the numbered passages. After each fact, \
                  cite the passage it comes from as [1], [2], and so on. If the passages do \
                  not contain the answer, say that you do not know.";
    let mut user = String::new();
    for p in passages {
        user.push_str(&format!("[{}] ({})\n{}\n\n", p.n, p.source, p.text.trim()));
    }
    user.push_str(&format!("Question: {}", question.trim()));
    vec![
        Message {
            role: "system".into(),
            content: system.into(),
        },
        Message {
            role: "user".into(),
            content: user,
        },
    ]
}

/// The passages an answer cites: every `[n]` (also `[1, 2]`) naming one of
/// the `count` passages, in order of first mention, each once.
pub fn cited(answer: &str, count: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for group in answer.split('[').skip(1) {
        let Some((inside, _)) = group.split_once(']') else {
            continue;
        };
        for n in inside
            .split(',')
            .filter_map(|t| t.trim().parse::<usize>().ok())
        {
            if (1..=count).contains(&n) && !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::cited;

    #[test]
    fn citations_are_read_once_in_order_of_mention() {
        assert_eq!(cited("Revenue was €48.2 million [2].", 4), vec![2]);
        assert_eq!(cited("A [3] and B [1, 3], C [1][2].", 4), vec![3, 1, 2]);
        // out of range, not a number, unclosed: ignored
        assert_eq!(cited("x [7] y [a] z [4", 4), Vec::<usize>::new());
        assert_eq!(cited("no citations", 4), Vec::<usize>::new());
    }
}

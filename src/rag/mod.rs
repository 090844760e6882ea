//! Retrieval-augmented generation: documents cut into chunks (`chunk`),
//! embedded and kept in an exact flat inner-product index on disk (`index`;
//! `ingest` puts files in), searched at question time (`search`), and the passages
//! cited in the answer.

pub mod answer;
pub mod chunk;
pub mod index;
pub mod ingest;
pub mod search;

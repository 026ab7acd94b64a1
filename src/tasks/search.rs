//! Semantic search: embed a corpus once, then rank its texts by cosine similarity to queries.

use super::embed::{cosine, Embedder};
use crate::error::{Error, Result};

/// A corpus with its embeddings.
pub struct Index {
    pub texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

/// One hit: the corpus text, its position in the corpus, and its similarity to the query.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Hit {
    pub index: usize,
    pub score: f32,
    pub text: String,
}

impl Index {
    /// Embed every corpus text; any text that cannot be embedded is an error naming its position.
    pub fn build(embedder: &Embedder, texts: Vec<String>) -> Result<Self> {
        if texts.is_empty() {
            return Err(Error::invalid("the search corpus is empty"));
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vectors = embedder
            .embed(&refs, true)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| v.map_err(|e| Error::invalid(format!("corpus text {}: {e}", i + 1))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Index { texts, vectors })
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The `top_k` corpus texts most similar to `query`, best first.
    pub fn search(&self, embedder: &Embedder, query: &str, top_k: usize) -> Result<Vec<Hit>> {
        let query = embedder.embed_strict(&[query], true)?.remove(0);
        let mut hits: Vec<Hit> = self
            .vectors
            .iter()
            .enumerate()
            .map(|(index, v)| Hit {
                index,
                score: cosine(&query, v),
                text: self.texts[index].clone(),
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(top_k);
        Ok(hits)
    }
}

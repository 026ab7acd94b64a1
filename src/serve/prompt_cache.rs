//! Recent prompts' key/value caches, so that a request beginning like an earlier one (the chat
//! template's system turn, a conversation's earlier turns) copies that beginning instead of
//! prefilling it again, as llama-server's prompt cache does. Bounded in bytes; the least
//! recently used prompts go first.

use std::collections::VecDeque;

use crate::error::Result;
use crate::models::kv_cache::KvCache;

/// The shortest shared beginning worth copying: below it, prefilling costs about as little.
const MIN_REUSED_TOKENS: usize = 4;

pub struct PromptCache {
    /// Prompts and their caches, least recently used first.
    entries: VecDeque<(Vec<u32>, KvCache)>,
    budget: usize,
}

impl PromptCache {
    /// A cache holding at most `budget` bytes of keys and values (0 turns it off).
    pub fn new(budget: usize) -> Self {
        PromptCache {
            entries: VecDeque::new(),
            budget,
        }
    }

    /// A copy of the longest cached beginning of `prompt` and its length in tokens. The prompt's
    /// last token is never taken: feeding it yields the logits of the first generated token.
    pub fn reuse(&mut self, prompt: &[u32]) -> Result<Option<(KvCache, usize)>> {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (tokens, _))| (i, shared_beginning(tokens, prompt).min(limit)))
            .max_by_key(|&(_, shared)| shared);
        let Some((index, shared)) = best.filter(|&(_, shared)| shared >= MIN_REUSED_TOKENS) else {
            return Ok(None);
        };
        let entry = self
            .entries
            .remove(index)
            .expect("index from the iteration above");
        let copy = entry.1.copy_prefix(shared);
        self.entries.push_back(entry);
        Ok(Some((copy?, shared)))
    }

    /// Keep the first `prompt.len()` positions of `cache` (a sequence just past its prompt) for
    /// later requests, unless a cached prompt already begins with this one. Cached prompts this
    /// one extends are dropped: it serves every request they would.
    pub fn keep(&mut self, prompt: &[u32], cache: &KvCache) -> Result<()> {
        if self.budget == 0 || prompt.len() < MIN_REUSED_TOKENS {
            return Ok(());
        }
        if self
            .entries
            .iter()
            .any(|(tokens, _)| tokens.starts_with(prompt))
        {
            return Ok(());
        }
        // Sized before copying: a prompt too long for the whole budget is never allocated twice.
        let size = cache.prefix_copy_bytes(prompt.len());
        if size > self.budget {
            return Ok(());
        }
        let copy = cache.copy_prefix(prompt.len())?;
        self.entries
            .retain(|(tokens, _)| !prompt.starts_with(tokens));
        self.entries.push_back((prompt.to_vec(), copy));
        while self.bytes() > self.budget {
            self.entries.pop_front();
        }
        Ok(())
    }

    /// Bytes the cached prompts' keys and values take.
    fn bytes(&self) -> usize {
        self.entries.iter().map(|(_, c)| c.allocated_bytes()).sum()
    }
}

/// How many tokens `a` and `b` begin with in common.
fn shared_beginning(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// A one-layer cache whose position `i` holds the value `tokens[i]`.
    fn filled(tokens: &[u32]) -> KvCache {
        let mut cache = KvCache::new(1, 1, 2, DType::F32, &Device::Cpu);
        for &t in tokens {
            let row = Tensor::full(t as f32, (1, 1, 2), &Device::Cpu).unwrap();
            cache.append(0, &row, &row).unwrap();
            cache.advance(1);
        }
        cache
    }

    fn positions(cache: &mut KvCache) -> Vec<f32> {
        let row = Tensor::zeros((1, 1, 2), DType::F32, &Device::Cpu).unwrap();
        let (keys, _) = cache.append(0, &row, &row).unwrap();
        let len = cache.len();
        keys.narrow(1, 0, len)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .step_by(2)
            .collect()
    }

    #[test]
    fn a_prompt_reuses_the_longest_cached_beginning_but_never_its_last_token() -> Result<()> {
        let mut prompts = PromptCache::new(1 << 20);
        let system = [1, 2, 3, 4, 5, 6];
        let first: Vec<u32> = system.iter().copied().chain([10, 11]).collect();
        prompts.keep(&first, &filled(&first))?;
        let second: Vec<u32> = system.iter().copied().chain([20, 21, 22]).collect();
        let (mut copy, shared) = prompts.reuse(&second)?.expect("the system turn is shared");
        assert_eq!(shared, 6);
        assert_eq!(positions(&mut copy), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // The same prompt again: all but its last token.
        let (mut copy, shared) = prompts.reuse(&first)?.expect("cached whole");
        assert_eq!(shared, first.len() - 1);
        assert_eq!(
            positions(&mut copy),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0]
        );
        // Too short a shared beginning is prefilled instead.
        assert!(prompts.reuse(&[1, 2, 3, 9, 9])?.is_none());
        Ok(())
    }

    #[test]
    fn the_byte_budget_drops_the_least_recently_used_prompts() -> Result<()> {
        let size = filled(&[0; 8]).copy_prefix(8)?.allocated_bytes();
        let mut prompts = PromptCache::new(2 * size);
        let prompt = |first: u32| -> Vec<u32> { (first..first + 8).collect() };
        for first in [100, 200] {
            prompts.keep(&prompt(first), &filled(&prompt(first)))?;
        }
        assert!(
            prompts.reuse(&prompt(100))?.is_some(),
            "100 is now the most recent"
        );
        prompts.keep(&prompt(300), &filled(&prompt(300)))?;
        assert!(prompts.bytes() <= 2 * size);
        assert!(
            prompts.reuse(&prompt(200))?.is_none(),
            "200 was the least recent"
        );
        assert!(prompts.reuse(&prompt(100))?.is_some());
        assert!(prompts.reuse(&prompt(300))?.is_some());

        // A prompt extending a cached one replaces it; one a cached prompt extends adds nothing.
        let longer: Vec<u32> = prompt(300).into_iter().chain([7, 7]).collect();
        prompts.keep(&longer, &filled(&longer))?;
        assert_eq!(prompts.entries.len(), 2);
        prompts.keep(&prompt(300), &filled(&prompt(300)))?;
        assert_eq!(prompts.entries.len(), 2);
        assert_eq!(prompts.reuse(&longer)?.unwrap().1, longer.len() - 1);
        // A prompt bigger than the whole budget is not kept, and evicts nothing.
        let huge: Vec<u32> = (1000..1100).collect();
        prompts.keep(&huge, &filled(&huge))?;
        assert!(prompts.reuse(&huge)?.is_none());
        assert_eq!(prompts.entries.len(), 2);

        let mut off = PromptCache::new(0);
        off.keep(&prompt(100), &filled(&prompt(100)))?;
        assert!(off.reuse(&prompt(100))?.is_none());
        Ok(())
    }
}

//! Per-sequence key/value cache, pre-allocated and grown ahead so decoding never re-copies it per token.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Large capacities grow in multiples of this many positions.
const GROW_BLOCK: usize = 256;
/// Small ones (short beams, fresh copies) double from multiples of this.
const SMALL_BLOCK: usize = 16;

/// The capacity to grow to when `needed` positions do not fit in `capacity`: doubling while
/// small, so that beam copies stay short, then whole blocks.
fn grown_capacity(capacity: usize, needed: usize) -> usize {
    let doubled = needed.max(2 * capacity).next_multiple_of(SMALL_BLOCK);
    doubled.min(needed.next_multiple_of(GROW_BLOCK))
}

/// Keys and values of every layer for one sequence. A batch is simply a slice of these,
/// each at its own position, which is what the server's continuous batching needs.
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

struct LayerCache {
    /// (kv_heads, capacity, head_dim); `None` until the first append.
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

/// The position shared by one step's decoder sequences (the beams of one source, which advance
/// together); an error when they disagree.
pub fn shared_position(caches: &[KvCache]) -> Result<usize> {
    let position = caches.first().map_or(0, KvCache::len);
    if caches.iter().any(|c| c.len() != position) {
        return Err(crate::Error::invalid(
            "decoder sequences of one step must be at the same position",
        ));
    }
    Ok(position)
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let layers = (0..num_layers)
            .map(|_| LayerCache {
                keys: None,
                values: None,
            })
            .collect();
        KvCache {
            layers,
            len: 0,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
        }
    }

    /// An empty cache shaped for a model's layers and key/value heads.
    pub fn for_model(info: &super::ModelInfo, dtype: DType, device: &Device) -> Self {
        Self::new(info.num_layers, info.kv_heads, info.head_dim, dtype, device)
    }

    /// An independent copy (beam search: two beams continuing from one parent) of the filled
    /// positions, with room for the next.
    pub fn deep_copy(&self) -> Result<Self> {
        self.copy_prefix(self.len)
    }

    /// An independent copy of the first `len` filled positions (at most all of them), with room
    /// for the next: the server reuses a cached prompt's beginning this way.
    pub fn copy_prefix(&self, len: usize) -> Result<Self> {
        let len = len.min(self.len);
        let capacity = self.copy_capacity(len);
        let copy = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            let Some(t) = t else { return Ok(None) };
            let fresh = Tensor::zeros(
                (self.kv_heads, capacity, self.head_dim),
                self.dtype,
                &self.device,
            )?;
            if len > 0 {
                fresh.slice_set(&t.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
            Ok(Some(fresh))
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerCache {
                    keys: copy(&l.keys)?,
                    values: copy(&l.values)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            len,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// Number of positions already stored (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget everything (the allocation is kept for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drop positions from `len` on, e.g. to rewind a shared prefix.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Store `keys`/`values` (kv_heads, t, head_dim) of `layer` after the current positions and
    /// return all keys and values so far, (kv_heads, len + t, head_dim).
    /// Positions become visible to `len()` only after `advance`, once every layer has appended.
    pub fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = keys.dim(1)?;
        let needed = self.len + t;
        let (kv_heads, head_dim, dtype, len) = (self.kv_heads, self.head_dim, self.dtype, self.len);
        let device = self.device.clone();
        let slot = &mut self.layers[layer];
        let capacity = slot.keys.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0));
        if needed > capacity {
            let new_capacity = grown_capacity(capacity, needed);
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let fresh = Tensor::zeros((kv_heads, new_capacity, head_dim), dtype, &device)?;
                if let (Some(old), true) = (old, len > 0) {
                    fresh.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
                Ok(fresh)
            };
            slot.keys = Some(grow(&slot.keys)?);
            slot.values = Some(grow(&slot.values)?);
        }
        let (all_keys, all_values) = match (&slot.keys, &slot.values) {
            (Some(k), Some(v)) => (k, v),
            _ => unreachable!("allocated above"),
        };
        all_keys.slice_set(&keys.contiguous()?, 1, len)?;
        all_values.slice_set(&values.contiguous()?, 1, len)?;
        Ok((
            all_keys.narrow(1, 0, needed)?,
            all_values.narrow(1, 0, needed)?,
        ))
    }

    /// Commit `t` new positions after all layers have appended them.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Bytes a [`copy_prefix`](Self::copy_prefix) of `len` positions allocates.
    pub fn prefix_copy_bytes(&self, len: usize) -> usize {
        let capacity = self.copy_capacity(len);
        let layers = self.layers.iter().filter(|l| l.keys.is_some()).count();
        2 * layers * self.kv_heads * capacity * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Positions a copy of the first `len` filled ones allocates: room for them and the next.
    fn copy_capacity(&self, len: usize) -> usize {
        grown_capacity(0, len.min(self.len) + 1)
    }

    /// Bytes held by this cache's allocations.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| l.keys.as_ref())
            .map(|k| 2 * k.elem_count() * self.dtype.size_in_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_grows_and_keeps_earlier_positions() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1, 2, 4, DType::F32, &dev);
        let first = Tensor::arange(0f32, 2.0 * 300.0 * 4.0, &dev)?.reshape((2, 300, 4))?;
        let (k, _) = cache.append(0, &first, &first)?;
        cache.advance(300);
        assert_eq!(k.dims(), &[2, 300, 4]);
        let second = Tensor::ones((2, 1, 4), DType::F32, &dev)?;
        let (k, v) = cache.append(0, &second, &second)?;
        cache.advance(1);
        assert_eq!(k.dims(), &[2, 301, 4]);
        assert_eq!(
            k.narrow(1, 0, 300)?.to_vec3::<f32>()?,
            first.to_vec3::<f32>()?
        );
        assert_eq!(
            v.narrow(1, 300, 1)?.flatten_all()?.to_vec1::<f32>()?,
            vec![1.0; 8]
        );
        assert_eq!(cache.len(), 301);
        Ok(())
    }

    #[test]
    fn copies_hold_the_filled_positions_and_grow_on_their_own() -> Result<()> {
        assert_eq!(grown_capacity(0, 1), 16);
        assert_eq!(grown_capacity(16, 17), 32);
        assert_eq!(grown_capacity(0, 100), 112);
        assert_eq!(grown_capacity(224, 225), 256);
        assert_eq!(grown_capacity(256, 257), 512);
        assert_eq!(grown_capacity(512, 513), 768);
        let dev = Device::Cpu;
        let mut parent = KvCache::new(2, 2, 4, DType::F32, &dev);
        let step = |i: usize| Tensor::full(i as f32, (2, 1, 4), &dev);
        for i in 0..20 {
            for layer in 0..2 {
                parent.append(layer, &step(i)?, &step(i)?)?;
            }
            parent.advance(1);
        }
        let mut child = parent.deep_copy()?;
        assert_eq!(child.len(), 20);
        for layer in 0..2 {
            parent.append(layer, &step(100)?, &step(100)?)?;
            let (k, _) = child.append(layer, &step(200)?, &step(200)?)?;
            let firsts: Vec<f32> = k.get(0)?.get(0)?.to_vec1()?;
            assert_eq!(firsts, vec![0.0; 4]);
            let column: Vec<f32> = k.get(1)?.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
            let expected: Vec<f32> = (0..20).map(|i| i as f32).chain([200.0]).collect();
            assert_eq!(column, expected);
        }
        parent.advance(1);
        child.advance(1);
        let (k, _) = parent.append(0, &step(7)?, &step(7)?)?;
        assert_eq!(k.get(0)?.get(20)?.to_vec1::<f32>()?, vec![100.0; 4]);

        // A prefix copy continues after its own last position, whatever the parent held after it.
        let mut prefix = parent.copy_prefix(5)?;
        assert_eq!(prefix.len(), 5);
        let (k, _) = prefix.append(1, &step(300)?, &step(300)?)?;
        let column: Vec<f32> = k.get(0)?.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(column, vec![0.0, 1.0, 2.0, 3.0, 4.0, 300.0]);
        assert_eq!(
            parent.prefix_copy_bytes(5),
            parent.copy_prefix(5)?.allocated_bytes()
        );
        assert_eq!(parent.copy_prefix(1000)?.len(), parent.len());
        Ok(())
    }
}

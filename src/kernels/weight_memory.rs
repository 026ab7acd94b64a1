//! Memory for a model's weights: mappings of their own, on transparent huge pages.
//!
//! Decode reads every weight once per token, so on 4 KiB pages it misses the TLB about once a
//! page: with the weights on 2 MiB pages SmolLM2 decodes ~15% faster. The global allocator is
//! built without huge pages (a partly used 2 MiB page of a short-lived buffer is resident in
//! full: ~30 MiB of the bench's peak), so the weights, which live as long as the model, get
//! their own anonymous mappings advised for huge pages. A model's few hundred matrices are
//! bump-allocated into shared chunks so that small ones share huge pages too; a chunk is
//! unmapped when the last buffer in it is dropped.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};

/// Virtual size of a chunk; only the pages written become resident.
const CHUNK_BYTES: usize = 64 << 20;
const HUGE_PAGE: usize = 2 << 20;
/// Start of every buffer: a cache line.
const ALIGN: usize = 64;

/// One anonymous mapping, its usable part starting on a huge-page boundary.
struct Chunk {
    map: memmap2::MmapMut,
    /// Offset of the huge-page-aligned start inside `map`.
    start: usize,
    capacity: usize,
}

impl Chunk {
    fn new(min_bytes: usize) -> std::io::Result<Chunk> {
        let capacity = min_bytes.max(CHUNK_BYTES).next_multiple_of(HUGE_PAGE);
        // One huge page more, so that the usable part can start on a boundary.
        let map = memmap2::MmapOptions::new()
            .len(capacity + HUGE_PAGE)
            .map_anon()?;
        let addr = map.as_ptr() as usize;
        let start = addr.next_multiple_of(HUGE_PAGE) - addr;
        #[cfg(target_os = "linux")]
        // Only a hint: without THP the weights work the same on small pages.
        let _ = map.advise_range(memmap2::Advice::HugePage, start, capacity);
        Ok(Chunk {
            map,
            start,
            capacity,
        })
    }

    fn base(&self) -> *mut u8 {
        // SAFETY: `start` < the mapping's length; buffers write only their own disjoint ranges.
        unsafe { (self.map.as_ptr() as *mut u8).add(self.start) }
    }
}

/// Where the next buffer goes: the chunk being filled (held weakly, so that dropping every
/// model unmaps it) and how much of it is handed out.
struct Cursor {
    chunk: Weak<Chunk>,
    used: usize,
}

static CURSOR: Mutex<Option<Cursor>> = Mutex::new(None);

/// A `bytes`-long zeroed range in a chunk: (the chunk, the offset in its usable part).
fn allocate(bytes: usize) -> std::io::Result<(Arc<Chunk>, usize)> {
    let mut cursor = CURSOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(current) = cursor.as_mut() {
        if let Some(chunk) = current.chunk.upgrade() {
            let offset = current.used.next_multiple_of(ALIGN);
            if offset + bytes <= chunk.capacity {
                current.used = offset + bytes;
                return Ok((chunk, offset));
            }
        }
    }
    let chunk = Arc::new(Chunk::new(bytes)?);
    *cursor = Some(Cursor {
        chunk: Arc::downgrade(&chunk),
        used: bytes,
    });
    Ok((chunk, 0))
}

/// Element types whose all-zero bytes are a valid value.
pub trait Zeroable: Copy + Default + Send + Sync + 'static {}
impl Zeroable for u8 {}
impl Zeroable for f32 {}

enum Owner<T> {
    Chunk(Arc<Chunk>),
    /// Where no mapping could be made (or none is needed): an ordinary allocation.
    Heap(#[allow(dead_code)] Vec<T>),
}

/// A zero-initialised slice of weights that lives as long as a model.
pub struct WeightBuf<T: Zeroable> {
    ptr: NonNull<T>,
    len: usize,
    owner: Owner<T>,
}

// SAFETY: the buffer owns its range exclusively (no other `WeightBuf` overlaps it) and `T` is
// Send + Sync; the chunk is shared only to keep the mapping alive.
unsafe impl<T: Zeroable> Send for WeightBuf<T> {}
unsafe impl<T: Zeroable> Sync for WeightBuf<T> {}

impl<T: Zeroable> WeightBuf<T> {
    /// `len` zeros on huge-page weight memory (on the heap if no mapping can be made).
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        if bytes > 0 {
            if let Ok((chunk, offset)) = allocate(bytes) {
                // SAFETY: offset + bytes ≤ the chunk's capacity; the range is aligned to ALIGN
                // (≥ align_of::<T>()), zeroed by the kernel and handed out once.
                let ptr = unsafe { NonNull::new_unchecked(chunk.base().add(offset) as *mut T) };
                return WeightBuf {
                    ptr,
                    len,
                    owner: Owner::Chunk(chunk),
                };
            }
        }
        Self::on_heap(vec![T::default(); len])
    }

    /// An ordinary heap vector as a buffer (short-lived matrices, tests).
    pub fn on_heap(mut data: Vec<T>) -> Self {
        let len = data.len();
        // SAFETY: a Vec's pointer is never null; its heap block does not move with the Vec.
        let ptr = unsafe { NonNull::new_unchecked(data.as_mut_ptr()) };
        WeightBuf {
            ptr,
            len,
            owner: Owner::Heap(data),
        }
    }
}

impl<T: Zeroable> Drop for WeightBuf<T> {
    fn drop(&mut self) {
        // Other buffers keep the chunk mapped: give back this one's whole pages now rather than
        // holding them until the last neighbour goes (a model reloaded in a long-lived process).
        if let Owner::Chunk(chunk) = &self.owner {
            if Arc::strong_count(chunk) > 1 {
                let begin = self.ptr.as_ptr() as usize - chunk.base() as usize + chunk.start;
                let end = begin + self.len * std::mem::size_of::<T>();
                let page = 4096;
                let (first, last) = (begin.next_multiple_of(page), end / page * page);
                if last > first {
                    #[cfg(unix)]
                    // SAFETY: the pages lie wholly inside this buffer's range, which nothing
                    // else reads or writes; they read back as zeros, and nothing reads them.
                    unsafe {
                        let _ = chunk.map.unchecked_advise_range(
                            memmap2::UncheckedAdvice::DontNeed,
                            first,
                            last - first,
                        );
                    }
                }
            }
        }
    }
}

impl<T: Zeroable> Deref for WeightBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points at `len` initialised, exclusively owned elements.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> DerefMut for WeightBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable + std::fmt::Debug> std::fmt::Debug for WeightBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_disjoint_aligned_and_survive_their_neighbours() {
        let mut a = WeightBuf::<f32>::zeroed(1000);
        let mut b = WeightBuf::<u8>::zeroed(3 << 20);
        assert!(a.iter().all(|&v| v == 0.0) && b.iter().all(|&v| v == 0));
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        a.fill(1.5);
        b.fill(7);
        let c = WeightBuf::<u8>::zeroed(100);
        assert!(c.iter().all(|&v| v == 0));
        drop(b);
        assert!(a.iter().all(|&v| v == 1.5));
        // Larger than a chunk: a mapping of its own.
        let big = WeightBuf::<u8>::zeroed(CHUNK_BYTES + 1);
        assert_eq!(big.len(), CHUNK_BYTES + 1);
        assert_eq!(big[CHUNK_BYTES], 0);
        assert!(WeightBuf::<f32>::zeroed(0).is_empty());
    }
}

//! GGUF files: memory-mapped, header parsed by candle's reader, every tensor's extent checked up front.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// An open GGUF file. Tensor bytes stay in the mapping; nothing is copied until asked for.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    content: Content,
}

/// Bytes of one tensor inside a shared mapping.
#[derive(Clone)]
pub struct MappedBytes {
    mmap: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl MappedBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.mmap[self.start..self.start + self.len]
    }

    /// Drop these bytes' pages from the process (after they were copied elsewhere). The mapping
    /// stays valid: a later read faults the unchanged file pages back in.
    pub fn release(&self) {
        #[cfg(unix)]
        // SAFETY: the mapping is private and read-only, so MADV_DONTNEED only discards clean
        // pages that the kernel re-reads from the file on the next access; no data is lost.
        // (An anonymous `from_bytes` mapping reads back as zeros: released only once copied.)
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.start,
                self.len,
            );
        }
    }

    /// Bytes from memory rather than a file (tests).
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: &[u8]) -> Self {
        let mut map = memmap2::MmapMut::map_anon(bytes.len()).expect("anonymous mapping");
        map.copy_from_slice(bytes);
        MappedBytes {
            mmap: Arc::new(map.make_read_only().expect("read-only mapping")),
            start: 0,
            len: bytes.len(),
        }
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; a model file changed underneath a running process is
        // outside what any inference engine can defend against (llama.cpp maps the same way).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut Cursor::new(&mmap[..]))
            .map_err(|e| Error::file(path, format!("corrupt or truncated GGUF header: {e}")))?;
        let gguf = GgufFile {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            content,
        };
        gguf.check_tensor_extents()?;
        Ok(gguf)
    }

    fn check_tensor_extents(&self) -> Result<()> {
        let file_len = self.mmap.len() as u64;
        for (name, info) in &self.content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(Error::file(
                    &self.path,
                    format!("tensor `{name}` has {elems} elements, not a multiple of its block size {block}"),
                ));
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = self.content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(Error::file(
                    &self.path,
                    format!("truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes"),
                ));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// The tensor's block type and its shape in (rows, cols) order, as HF writes it.
    pub fn tensor_type(&self, name: &str) -> Result<(GgmlDType, Vec<usize>)> {
        let info = self.info(name)?;
        Ok((info.ggml_dtype, info.shape.dims().to_vec()))
    }

    /// The raw bytes of a tensor, shared with the mapping.
    pub fn tensor_bytes(&self, name: &str) -> Result<MappedBytes> {
        let info = self.info(name)?;
        let elems = info.shape.elem_count();
        let len = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        Ok(MappedBytes {
            mmap: self.mmap.clone(),
            start,
            len,
        })
    }

    /// A tensor as candle's quantized type (a copy), for block types without our own kernels.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        self.content
            .tensor(&mut Cursor::new(&self.mmap[..]), name, device)
            .map_err(|e| Error::file(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// A tensor dequantized to a dense tensor of `dtype`.
    pub fn dense(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (ggml, dims) = self.tensor_type(name)?;
        let tensor = match ggml {
            GgmlDType::F32 => {
                let bytes = self.tensor_bytes(name)?;
                Tensor::from_raw_buffer(bytes.as_slice(), DType::F32, &dims, device)?
            }
            GgmlDType::F16 => {
                let bytes = self.tensor_bytes(name)?;
                Tensor::from_raw_buffer(bytes.as_slice(), DType::F16, &dims, device)?
            }
            _ => self.qtensor(name, device)?.dequantize(device)?,
        };
        Ok(tensor.to_dtype(dtype)?)
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::file(&self.path, format!("metadata key `{key}` is missing")))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.value(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| Error::file(&self.path, format!("metadata `{key}`: {e}")))
    }

    pub fn get_string(&self, key: &str) -> Result<String> {
        self.get_str(key).map(str::to_string)
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let value = self.value(key)?;
        let n = match value {
            Value::U8(v) => *v as u64,
            Value::U16(v) => *v as u64,
            Value::U32(v) => *v as u64,
            Value::U64(v) => *v,
            Value::I8(v) if *v >= 0 => *v as u64,
            Value::I16(v) if *v >= 0 => *v as u64,
            Value::I32(v) if *v >= 0 => *v as u64,
            Value::I64(v) if *v >= 0 => *v as u64,
            other => {
                return Err(Error::file(
                    &self.path,
                    format!("metadata `{key}`: expected an integer, found {other:?}"),
                ))
            }
        };
        u32::try_from(n)
            .map_err(|_| Error::file(&self.path, format!("metadata `{key}`: {n} is too large")))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.value(key)? {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            _ => self.get_u32(key).map(|v| v as f32),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.value(key)?
            .to_bool()
            .map_err(|e| Error::file(&self.path, format!("metadata `{key}`: {e}")))
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<String>> {
        self.get_array(key, |v| v.to_string().cloned())
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.get_array(key, Value::to_f32)
    }

    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.get_array(key, Value::to_i32)
    }

    fn get_array<T>(
        &self,
        key: &str,
        convert: impl Fn(&Value) -> candle_core::Result<T>,
    ) -> Result<Vec<T>> {
        let malformed =
            |e: candle_core::Error| Error::file(&self.path, format!("metadata `{key}`: {e}"));
        self.value(key)?
            .to_vec()
            .map_err(malformed)?
            .iter()
            .map(|v| convert(v).map_err(malformed))
            .collect()
    }

    /// Optional lookups: `None` when the key is absent, an error when present but malformed.
    pub fn opt<T>(&self, key: &str, get: impl Fn(&Self, &str) -> Result<T>) -> Result<Option<T>> {
        if self.content.metadata.contains_key(key) {
            get(self, key).map(Some)
        } else {
            Ok(None)
        }
    }
}

//! General f32 products of matrices viewed in place, on the `gemm` crate (candle's own GEMM).
//!
//! Training's products read their operands where they lie: a weight transposed, one attention
//! head's columns inside the fused q/k/v rows, a gradient written straight into its head's
//! columns. A view's strides say how, so nothing is copied to make an operand contiguous.

/// A matrix in memory: element (r, c) at `ptr + r·row_stride + c·col_stride`.
#[derive(Clone, Copy)]
pub struct MatrixView {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl MatrixView {
    /// The row-major matrix of `cols` columns held in `values`.
    pub fn rows(values: &[f32], cols: usize) -> Self {
        Self::strided(values, cols)
    }

    /// Rows `row_stride` apart from the start of `values`, each read as far as the product
    /// needs: columns of a wider matrix.
    pub fn strided(values: &[f32], row_stride: usize) -> Self {
        MatrixView {
            ptr: values.as_ptr(),
            row_stride: row_stride as isize,
            col_stride: 1,
        }
    }

    /// The transpose of this matrix.
    pub fn t(self) -> Self {
        MatrixView {
            ptr: self.ptr,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `out (m × n, rows out_row_stride apart) = scale · a (m × k) · b (k × n)`, added to what `out`
/// holds when `accumulate`. On rayon's pool when `parallel`, else on the calling thread (inside
/// a parallel task of one's own).
///
/// # Safety
/// `a` and `b` must view memory that holds their (m × k) and (k × n) elements for the duration
/// of the call, and `out` must be valid for writes at every (r < m, c < n) element, with no other
/// thread touching those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    out: *mut f32,
    out_row_stride: usize,
    a: MatrixView,
    b: MatrixView,
    scale: f32,
    accumulate: bool,
    parallel: bool,
) {
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: as the caller promises. gemm computes dst = alpha·dst + beta·lhs·rhs, reading
    // dst only when asked to.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_row_stride as isize,
            accumulate,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

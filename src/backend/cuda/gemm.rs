//! Prefill GEMM through cuBLAS: y (t, n) f32 = x (t, k) bf16 @ W (n, k)^T bf16, f32
//! accumulation (cublasGemmEx, tensor cores). Row-major on our side is column-major
//! transposed on cuBLAS's: y^T (n, t) = W (n, k) . x^T (k, t), so A = W with op T (W is a
//! column-major (k, n) array, lda = k), B = x with op N (column-major (k, t), ldb = k).
//!
//! Distillation's f32 GEMMs ([`Gemm::f32_rm`]) use the same transposition with either operand
//! optionally transposed, full f32 (cuBLAS's default math mode: no TF32).

use crate::error::{Error, Result};
use cudarc::cublas::{sys, CudaBlas, GemmConfig};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;
use std::sync::Arc;

fn blas_err(e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("cuBLAS: {e:?}"))
}

/// One cuBLAS handle bound to one stream (a rank's compute stream).
pub struct Gemm {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
}

impl Gemm {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Gemm> {
        Ok(Gemm {
            blas: CudaBlas::new(stream.clone()).map_err(blas_err)?,
            stream: stream.clone(),
        })
    }

    /// y (t, n) = x (t, k) @ W (n, k)^T; y is overwritten (beta = 0).
    pub fn bf16_f32(
        &self,
        (t, n, k): (usize, usize, usize),
        w: &CudaView<bf16>,
        x: &CudaView<bf16>,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        if w.len() < n * k || x.len() < t * k || y.len() < t * n {
            return Err(Error::InvalidArgument(format!(
                "gemm: buffers too small for t={t} n={n} k={k}"
            )));
        }
        if t == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return Err(Error::InvalidArgument("gemm: k = 0".into()));
        }
        let (alpha, beta) = (1f32, 0f32);
        let (wp, _gw) = w.device_ptr(&self.stream);
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (yp, _gy) = y.device_ptr_mut(&self.stream);
        // SAFETY: pointers are live device allocations of the sizes checked above, on the
        // handle's stream; alpha/beta are host scalars (the default pointer mode).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                t as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                wp as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                xp as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                yp as *mut _,
                sys::cudaDataType::CUDA_R_32F,
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err)
    }

    /// Row-major f32: C (m, n) = op(A) @ op(B) + beta C, with op(A) (m, k) and op(B) (k, n).
    /// `ta`: A is stored (k, m) and used transposed (else stored (m, k)); likewise `tb`: B is
    /// stored (n, k) (else (k, n)). cuBLAS is column-major, so it computes C^T = op(B)^T
    /// op(A)^T: B goes first.
    #[allow(clippy::too_many_arguments)]
    pub fn f32_rm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        (m, n, k): (usize, usize, usize),
        (a, ta): (&A, bool),
        (b, tb): (&B, bool),
        beta: f32,
        c: &mut C,
    ) -> Result<()> {
        if a.len() < m * k || b.len() < k * n || c.len() < m * n {
            return Err(Error::InvalidArgument(format!(
                "gemm f32: buffers too small for m={m} n={n} k={k}"
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return Err(Error::InvalidArgument("gemm f32: k = 0".into()));
        }
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let cfg = GemmConfig {
            transa: op(tb),
            transb: op(ta),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1f32,
            lda: if tb { k } else { n } as i32,
            ldb: if ta { m } else { k } as i32,
            beta,
            ldc: n as i32,
        };
        // SAFETY: the three buffers hold at least the elements the shapes above read and
        // write (checked), and live on the handle's stream.
        unsafe { cudarc::cublas::Gemm::gemm(&self.blas, cfg, b, a, c) }.map_err(blas_err)
    }
}

//! TMA tensor maps ([`LkTensorMap`], `kernels/include/lk_params.h`): a 2-D
//! row-major matrix as Hopper's tile loads (`lk::tma_load_2d`) see it. On a
//! GPU the driver encodes it (`cuTensorMapEncodeTiled`); on the host runtime
//! it holds the mirror the emulation reads (`kernels/host/lk_host_hopper.h`).
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::params::LkTensorMap;
use crate::shape::invalid;

/// `kTensorMapMagic` of `kernels/host/lk_host_hopper.h`: marks a host mirror.
const HOST_MAGIC: u64 = 0x3130_4d54_534f_484c;

/// A row-major `rows x cols` matrix of `dtype` at `ptr` (a device address,
/// or a host one on the host runtime), loaded in boxes of `box_rows x
/// box_cols` elements whose rows land `swizzle`-swizzled (0, 32, 64 or 128
/// bytes; a swizzled box row is exactly that wide).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileMap2d {
    pub ptr: u64,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub box_rows: u32,
    pub box_cols: u32,
    pub swizzle: u32,
}

/// The tensor map of `m` for launches on `dev`, after checking what the
/// hardware requires of it (the driver checks again on a GPU).
pub(crate) fn tensor_map_2d(dev: &Device, m: &TileMap2d) -> Result<LkTensorMap> {
    let elem = m.dtype.size();
    let row_stride = m.cols as u64 * elem as u64;
    if !m.ptr.is_multiple_of(16) {
        return Err(invalid(
            "tensor map address",
            m.ptr,
            "must be 16-byte aligned",
        ));
    }
    if m.rows == 0
        || m.cols == 0
        || m.rows as u64 > u32::MAX as u64
        || m.cols as u64 > u32::MAX as u64
    {
        return Err(invalid(
            "tensor map dims",
            format!("{} x {}", m.rows, m.cols),
            "each must be in 1..=2^32-1",
        ));
    }
    if !row_stride.is_multiple_of(16) {
        return Err(invalid(
            "tensor map row stride",
            row_stride,
            "must be a multiple of 16 bytes",
        ));
    }
    let box_bytes = m.box_cols as usize * elem;
    if !(1..=256).contains(&m.box_rows)
        || !(1..=256).contains(&m.box_cols)
        || !box_bytes.is_multiple_of(16)
    {
        return Err(invalid(
            "tensor map box",
            format!("{} x {}", m.box_rows, m.box_cols),
            "each side in 1..=256 elements, rows a multiple of 16 bytes",
        ));
    }
    if ![0, 32, 64, 128].contains(&m.swizzle) || (m.swizzle != 0 && box_bytes != m.swizzle as usize)
    {
        return Err(invalid(
            "tensor map swizzle",
            m.swizzle,
            format!(
                "must be 0, or 32, 64 or 128 bytes and equal to the box's row of {box_bytes} bytes"
            ),
        ));
    }
    match dev {
        Device::Host(_) => {
            let mut opaque = [0u64; 16];
            opaque[..7].copy_from_slice(&[
                HOST_MAGIC,
                m.ptr,
                m.cols as u64,
                m.rows as u64,
                row_stride,
                m.box_cols as u64 | (m.box_rows as u64) << 32,
                elem as u64 | (m.swizzle as u64) << 32,
            ]);
            Ok(LkTensorMap { opaque })
        }
        Device::Cuda(d) => encode_tiled(d, m, row_stride),
    }
}

fn encode_tiled(
    d: &crate::device::CudaDevice,
    m: &TileMap2d,
    row_stride: u64,
) -> Result<LkTensorMap> {
    use cudarc::driver::sys;
    let dtype = match m.dtype {
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        DType::F64 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT64,
    };
    let swizzle = match m.swizzle {
        32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
        64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        _ => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
    };
    let dims = [m.cols as u64, m.rows as u64];
    let strides = [row_stride];
    let boxes = [m.box_cols, m.box_rows];
    let element_strides = [1u32, 1];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    d.stream().context().bind_to_thread()?;
    // SAFETY: every pointer names a live local array of the length the
    // driver reads for a rank-2 map (dims and box 2, strides 1); `map` is a
    // writable CUtensorMap. The driver validates the values and reports
    // what it refuses through the result.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            2,
            m.ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()?;
    Ok(LkTensorMap { opaque: map.opaque })
}

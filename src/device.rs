//! Where ops run: a CUDA device (through cudarc) or the host runtime.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, ValidAsZeroBits,
};

use crate::buffer::{Buffer, Home};
use crate::error::{Backend, Error, Result};
use crate::shape::invalid;

/// A CUDA device with one stream, and the kernel modules loaded on it.
pub struct CudaDevice {
    stream: Arc<CudaStream>,
    compute_capability: (i32, i32),
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded functions with the dynamic shared memory they were opened up to.
    functions: Mutex<HashMap<&'static str, (CudaFunction, u32)>>,
}

/// The device an op runs on. Cheap to clone.
#[derive(Clone)]
pub enum Device {
    /// A GPU, through cudarc: ops are queued on its stream.
    Cuda(Arc<CudaDevice>),
    /// The host runtime: the kernels' own source executed on the CPU, one
    /// launch at a time and synchronously (docs/DESIGN.md section 6). Needs
    /// the `host` cargo feature.
    Host(HostSchedule),
}

/// Which thread of a block the host runtime runs first between barriers.
/// Running a kernel under both exposes a missing barrier whichever way its
/// threads depend on each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostSchedule {
    /// Thread 0 first (what [`Device::host`] uses).
    #[default]
    Forward,
    /// The last thread first.
    Reverse,
}

impl Device {
    /// Opens GPU `ordinal` with a new stream. Returns [`Error::NoDriver`] when
    /// libcuda cannot be loaded (no NVIDIA driver) and [`Error::NoDevice`] when
    /// there is no such GPU, instead of cudarc's panic.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        Self::from_stream(ctx.new_stream()?)
    }

    /// Runs ops on a stream the caller owns (an engine's own stream).
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        let compute_capability = ctx.compute_capability()?;
        let name = ctx.name()?;
        Ok(Device::Cuda(Arc::new(CudaDevice {
            stream,
            compute_capability,
            name,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })))
    }

    /// The host runtime, or [`Error::HostRuntimeNotBuilt`] without the `host` feature.
    pub fn host() -> Result<Self> {
        Self::host_with_schedule(HostSchedule::Forward)
    }

    /// The host runtime running threads in the given order (tests run both).
    pub fn host_with_schedule(schedule: HostSchedule) -> Result<Self> {
        if cfg!(feature = "host") {
            Ok(Device::Host(schedule))
        } else {
            Err(Error::HostRuntimeNotBuilt)
        }
    }

    /// Which backend this device is, for comparing with a buffer's.
    pub fn backend(&self) -> Backend {
        match self {
            Device::Cuda(_) => Backend::Cuda,
            Device::Host(_) => Backend::Host,
        }
    }

    /// Where the device's memory lives: the host, or its CUDA context.
    pub(crate) fn home(&self) -> Home {
        match self {
            Device::Cuda(d) => Home::of_context(d.stream.context()),
            Device::Host(_) => Home::Host,
        }
    }

    /// A human-readable name: the GPU's, or "host runtime (CPU)".
    pub fn name(&self) -> String {
        match self {
            Device::Cuda(d) => format!(
                "{} (sm_{}{})",
                d.name, d.compute_capability.0, d.compute_capability.1
            ),
            Device::Host(_) => "host runtime (CPU)".into(),
        }
    }

    /// The CUDA stream ops are queued on (None on the host runtime): use it
    /// to order the crate's launches with an engine's own work.
    pub fn cuda_stream(&self) -> Option<&Arc<CudaStream>> {
        match self {
            Device::Cuda(d) => Some(&d.stream),
            Device::Host(_) => None,
        }
    }

    /// Waits for all work queued on the device (a no-op on the host runtime,
    /// whose launches are synchronous).
    pub fn synchronize(&self) -> Result<()> {
        if let Device::Cuda(d) = self {
            d.stream.synchronize()?;
        }
        Ok(())
    }

    /// Copies `data` to a new buffer on this device; an error (not an abort)
    /// when the memory cannot be had.
    pub fn upload<T: DeviceRepr + Clone>(&self, data: &[T]) -> Result<Buffer<T>> {
        Ok(match self {
            Device::Cuda(d) => Buffer::Cuda(d.stream.clone_htod(data)?),
            Device::Host(_) => {
                let mut v = host_vec("data", data.len())?;
                v.extend_from_slice(data);
                Buffer::Host(v)
            }
        })
    }

    /// A zero-filled buffer of `len` elements; an error (not an abort) when
    /// `len` elements cannot be had.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits + Clone + Default>(
        &self,
        len: usize,
    ) -> Result<Buffer<T>> {
        byte_len::<T>("len", len)?;
        Ok(match self {
            Device::Cuda(d) => Buffer::Cuda(d.stream.alloc_zeros(len)?),
            Device::Host(_) => {
                let mut v = host_vec("len", len)?;
                v.resize(len, T::default());
                Buffer::Host(v)
            }
        })
    }

    /// Copies a buffer back to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Clone + Default>(&self, buf: &Buffer<T>) -> Result<Vec<T>> {
        match (self, buf) {
            (Device::Cuda(d), Buffer::Cuda(s)) => Ok(d.stream.clone_dtoh(s)?),
            (_, Buffer::Host(v)) => Ok(v.clone()),
            (Device::Host(_), Buffer::Cuda(_)) => Err(Error::BackendMismatch {
                operand: "buffer",
                expected: Backend::Host,
                actual: Backend::Cuda,
            }),
        }
    }
}

/// The bytes `len` elements of `T` take, or an error naming `name` when that
/// overflows what one allocation can hold (`isize::MAX` bytes).
fn byte_len<T>(name: &'static str, len: usize) -> Result<usize> {
    len.checked_mul(std::mem::size_of::<T>())
        .filter(|&bytes| bytes <= isize::MAX as usize)
        .ok_or_else(|| invalid(name, len, "too many elements for one allocation"))
}

/// An empty host vector with room for `len` elements, or an error when the
/// allocator cannot provide it (instead of `Vec`'s abort).
fn host_vec<T>(name: &'static str, len: usize) -> Result<Vec<T>> {
    byte_len::<T>(name, len)?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|e| {
        invalid(
            name,
            len,
            format!("cannot allocate the host runtime's buffer: {e}"),
        )
    })?;
    Ok(v)
}

impl CudaDevice {
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Kernel `name` of file `file`, looked up once per device, allowed to use
    /// `dynamic_smem` bytes of dynamic shared memory (above 48 KiB a function
    /// must be opened up explicitly).
    pub(crate) fn function(
        &self,
        file: &'static str,
        name: &'static str,
        dynamic_smem: u32,
    ) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((f, allowed)) = functions.get(name)
            && *allowed >= dynamic_smem
        {
            return Ok(f.clone());
        }
        let f = self.module(file)?.load_function(name)?;
        if dynamic_smem > 48 * 1024 {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic_smem as i32,
            )?;
        }
        functions.insert(name, (f.clone(), dynamic_smem.max(48 * 1024)));
        Ok(f)
    }

    /// The module of kernel file `file`, loaded once per device: the cubin
    /// built for this architecture if there is one, else the PTX (JIT-compiled
    /// by the driver).
    pub(crate) fn module(&self, file: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(file) {
            return Ok(m.clone());
        }
        let (major, minor) = self.compute_capability;
        let image = crate::launch::image(file).ok_or(Error::KernelsNotBuilt)?;
        // A cubin for sm_XY runs on devices of the same major version with minor >= Y.
        let cubin = image
            .cubins
            .iter()
            .filter(|(sm, _)| (*sm / 10) as i32 == major && (*sm % 10) as i32 <= minor)
            .max_by_key(|(sm, _)| *sm);
        let ptx = match (cubin, image.ptx) {
            (Some((_, bytes)), _) => cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()),
            (None, Some(ptx)) if major >= 8 => cudarc::nvrtc::Ptx::from_src(ptx),
            _ => {
                return Err(Error::NoImage {
                    kernel: file,
                    major,
                    minor,
                });
            }
        };
        let module = self.stream.context().load_module(ptx)?;
        modules.insert(file, module.clone());
        Ok(module)
    }
}

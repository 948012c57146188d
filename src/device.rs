//! Where ops run: a CUDA device (through cudarc) or the host runtime.
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};

use crate::buffer::{Buffer, Home};
use crate::error::{Backend, Error, Result};
use crate::shape::invalid;

/// A CUDA device: a stream, and the kernels of its CUDA context.
pub struct CudaDevice {
    stream: Arc<CudaStream>,
    kernels: Arc<ContextKernels>,
}

/// What one CUDA context has loaded of this crate: shared by every [`Device`]
/// on that context, whatever its stream, so that wrapping an engine's stream
/// on every call ([`Device::from_stream`]) loads nothing twice.
struct ContextKernels {
    /// Keeps the context (and so the key it is filed under) alive: a cached
    /// module is only valid in its context, and a destroyed context's handle
    /// could be reused by a new one.
    _context: Arc<CudaContext>,
    compute_capability: (i32, i32),
    /// Shared memory one block may opt in to (static and dynamic), bytes.
    max_block_smem: usize,
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded functions with the dynamic shared memory they were opened up to.
    functions: Mutex<HashMap<&'static str, (CudaFunction, u32)>>,
    /// Streaming multiprocessors.
    sm_count: usize,
    /// The split-K workspaces of each stream that has used one, by the
    /// address of the stream's handle ([`Device::split_k_scratch`]), the
    /// current one last. Kept while the context lives, also those a larger
    /// one replaced: a CUDA graph captured with one may still run.
    split_scratch: Mutex<HashMap<usize, Vec<Arc<CudaSlice<f32>>>>>,
}

/// A split-K launch's workspace ([`Device::split_k_scratch`]).
pub(crate) enum SplitScratch {
    /// The stream's own, kept between launches.
    Cuda(Arc<CudaSlice<f32>>),
    /// The host runtime's, one per thread (its launches run on the calling
    /// thread, one at a time), lent to a launch and given back on drop: kept
    /// between launches like a stream's, so a launch that leaves a counter
    /// behind fails the next one there too.
    Host(Vec<f32>),
}

thread_local! {
    /// This thread's host-runtime split-K workspace, while no launch holds it.
    static HOST_SPLIT_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for SplitScratch {
    fn drop(&mut self) {
        if let SplitScratch::Host(v) = self {
            let v = std::mem::take(v);
            HOST_SPLIT_SCRATCH.with(|s| *s.borrow_mut() = v);
        }
    }
}

/// Shared memory a block of sm_90 may opt in to (227 KiB).
pub(crate) const SM90_MAX_BLOCK_SMEM: usize = 227 * 1024;
/// The streaming multiprocessors the host runtime counts: an H100 / H200 SXM's.
pub(crate) const HOST_SM_COUNT: usize = 132;

/// Every context's kernels, by the address of the context's driver handle.
static CONTEXTS: LazyLock<Mutex<HashMap<usize, Arc<ContextKernels>>>> =
    LazyLock::new(Default::default);

impl ContextKernels {
    /// The kernels of `ctx`, created (device queried, nothing loaded yet) on
    /// first use of the context.
    fn of(ctx: &Arc<CudaContext>) -> Result<Arc<ContextKernels>> {
        let mut contexts = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
        let key = ctx.cu_ctx() as usize;
        if let Some(kernels) = contexts.get(&key) {
            return Ok(kernels.clone());
        }
        let kernels = Arc::new(ContextKernels {
            _context: ctx.clone(),
            compute_capability: ctx.compute_capability()?,
            max_block_smem: ctx.attribute(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )? as usize,
            name: ctx.name()?,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            sm_count: ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
                as usize,
            split_scratch: Mutex::new(HashMap::new()),
        });
        contexts.insert(key, kernels.clone());
        Ok(kernels)
    }
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
/// threads depend on each other; `Interleaved` exposes warps that share data
/// without a block barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostSchedule {
    /// Thread 0 first (what [`Device::host`] uses): each warp runs to the
    /// next `__syncthreads` before the next warp starts.
    #[default]
    Forward,
    /// The last thread first.
    Reverse,
    /// The threads take turns: after a thread blocks, the next runnable
    /// thread after it runs (cyclically), so the warps interleave at every
    /// warp collective (`__syncwarp`, shuffles, votes). Shared memory one
    /// warp writes and another reads between two block barriers shows up
    /// as the other warp's data.
    Interleaved,
}

impl Device {
    /// Opens GPU `ordinal` with a new stream. Returns [`Error::NoDriver`] when
    /// libcuda cannot be loaded (no NVIDIA driver) and [`Error::NoDevice`] when
    /// there is no such GPU, instead of cudarc's panic.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        if !cuda_library_present("cuda", "nvcuda") {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        Self::from_stream(ctx.new_stream()?)
    }

    /// Runs ops on a stream the caller owns (an engine's own stream). Cheap
    /// after the first call on a context: the kernel modules are loaded once
    /// per CUDA context and shared by every `Device` on it.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let kernels = ContextKernels::of(stream.context())?;
        Ok(Device::Cuda(Arc::new(CudaDevice { stream, kernels })))
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
            Device::Cuda(d) => {
                let (major, minor) = d.kernels.compute_capability;
                format!("{} (sm_{major}{minor})", d.kernels.name)
            }
            Device::Host(_) => "host runtime (CPU)".into(),
        }
    }

    /// The GPU's compute capability (major, minor); None on the host
    /// runtime. The wgmma kernels run on 9.0 (and on the host runtime).
    pub fn compute_capability(&self) -> Option<(i32, i32)> {
        match self {
            Device::Cuda(d) => Some(d.kernels.compute_capability),
            Device::Host(_) => None,
        }
    }

    /// The most shared memory (static and dynamic, bytes) a block may opt in
    /// to: the GPU's, or on the host runtime sm_90's 227 KiB (its kernels
    /// are the sm_90 build's source). Launches pick their pipeline depth by it.
    pub(crate) fn max_block_smem(&self) -> usize {
        match self {
            Device::Cuda(d) => d.kernels.max_block_smem,
            Device::Host(_) => SM90_MAX_BLOCK_SMEM,
        }
    }

    /// Streaming multiprocessors: the GPU's, or on the host runtime 132 (an
    /// H100 / H200 SXM's). Launches size their split-K by it, and the
    /// dispatch its choice of the wgmma prefill (`ops::wgmma_dispatch`).
    pub fn sm_count(&self) -> usize {
        match self {
            Device::Cuda(d) => d.kernels.sm_count,
            Device::Host(_) => HOST_SM_COUNT,
        }
    }

    /// The split-K workspace for a launch on this device: `len` f32 values,
    /// whose counters (the launch's choice) are 0 between launches, as the
    /// split-K kernels leave them. On a GPU it is the stream's own, allocated
    /// zeroed on the stream's first split-K launch and kept (launches on one
    /// stream run one at a time, so they can share it); None while the
    /// stream is being captured into a CUDA graph without one of `len` yet
    /// (an allocation can't be captured: the launch then runs without
    /// split-K). A larger `len` than the stream's gets a new one, at least
    /// twice as large, zeroed; the old one is kept. On the host runtime the
    /// thread's own.
    pub(crate) fn split_k_scratch(&self, len: usize) -> Result<Option<SplitScratch>> {
        let d = match self {
            Device::Host(_) => {
                let mut v = HOST_SPLIT_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
                if v.len() < len {
                    v = host_vec("scratch", len)?;
                    v.resize(len, 0.0);
                }
                return Ok(Some(SplitScratch::Host(v)));
            }
            Device::Cuda(d) => d,
        };
        let key = d.stream.cu_stream() as usize;
        let mut scratch = d
            .kernels
            .split_scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let kept = scratch.entry(key).or_default();
        let current = kept.last().map_or(0, |s| s.len());
        if current >= len {
            return Ok(kept.last().map(|s| SplitScratch::Cuda(s.clone())));
        }
        let capturing = d.stream.capture_status()?
            != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        if capturing {
            return Ok(None);
        }
        let s = Arc::new(d.stream.alloc_zeros::<f32>(len.max(2 * current))?);
        kept.push(s.clone());
        Ok(Some(SplitScratch::Cuda(s)))
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

/// True when CUDA library `name` (`windows_name` on Windows) can be loaded.
///
/// cudarc loads the libraries lazily and panics when one is missing, and its
/// own probe exists only when it loads them at run time; when the build links
/// them instead (candle's `cuda`), a running binary already has them. The
/// names tried here are all among those cudarc tries, so a library found here
/// is one cudarc finds.
pub(crate) fn cuda_library_present(name: &str, windows_name: &str) -> bool {
    let major = cudarc::driver::sys::CUDA_VERSION / 1000;
    let candidates = if cfg!(windows) {
        vec![
            format!("{windows_name}.dll"),
            format!("{name}64_{major}.dll"),
        ]
    } else {
        vec![
            format!("lib{name}.so"),
            format!("lib{name}.so.{major}"),
            format!("lib{name}.so.1"),
        ]
    };
    candidates.iter().any(|lib| {
        // SAFETY: loading a CUDA library runs only its own initialisers, as
        // cudarc's loader does with the same names.
        unsafe { libloading::Library::new(lib) }.is_ok()
    })
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

    /// Kernel `name` of file `file`, looked up once per context, allowed to use
    /// `dynamic_smem` bytes of dynamic shared memory (above 48 KiB a function
    /// must be opened up explicitly).
    pub(crate) fn function(
        &self,
        file: &'static str,
        name: &'static str,
        dynamic_smem: u32,
    ) -> Result<CudaFunction> {
        let mut functions = self
            .kernels
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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

    /// The module of kernel file `file`, loaded once per context: the cubin
    /// built for this architecture if there is one, else the PTX (JIT-compiled
    /// by the driver).
    pub(crate) fn module(&self, file: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self
            .kernels
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(file) {
            return Ok(m.clone());
        }
        let (major, minor) = self.kernels.compute_capability;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// GPU only: every `Device` on one CUDA context shares its kernels,
    /// whatever the stream, and a launch through either works.
    #[test]
    fn devices_on_one_context_share_their_kernels() {
        let first = match Device::cuda(0) {
            Ok(dev) if crate::kernels_built() => dev,
            other => {
                let why = other
                    .err()
                    .map_or("built without nvcc".into(), |e| e.to_string());
                assert!(
                    std::env::var("LORA_KERNELS_REQUIRE_GPU").as_deref() != Ok("1"),
                    "LORA_KERNELS_REQUIRE_GPU=1 but no GPU is usable: {why}"
                );
                // Straight to stderr, past the harness's capture, as the
                // integration tests' skips do.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "note [lib]: devices_on_one_context_share_their_kernels: skipped (needs a GPU): {why}"
                );
                return;
            }
        };
        let Device::Cuda(one) = &first else {
            unreachable!("Device::cuda gives a CUDA device")
        };
        let stream = one.stream.context().new_stream().expect("a second stream");
        let second = Device::from_stream(stream).expect("a device on the second stream");
        let Device::Cuda(two) = &second else {
            unreachable!("from_stream gives a CUDA device")
        };
        assert!(Arc::ptr_eq(&one.kernels, &two.kernels));
        assert!(!Arc::ptr_eq(&one.stream, &two.stream));
        // The modules each launch loaded, by file: the second device's
        // launch must find the first's modules, not load them again.
        let mut loaded = Vec::new();
        for dev in [&first, &second] {
            let (x, w) = (
                dev.upload(&[1.0f32; 4]).unwrap(),
                dev.upload(&[2.0f32; 4]).unwrap(),
            );
            let (a, b) = (
                dev.upload(&[1.0f32; 2]).unwrap(),
                dev.upload(&[1.0f32; 2]).unwrap(),
            );
            let mut y = dev.zeros::<f32>(4).unwrap();
            let adapter = crate::DeviceAdapter::new(&a, &b, 1, 1.0);
            let dims = crate::Dims::new(2, 2, 2);
            crate::ops::fused_forward::fused_forward(dev, dims, &x, &w, &adapter, 0.0, &mut y)
                .unwrap();
            // x w^T = 4, t = 2, s t b^T = 2.
            assert_eq!(dev.download(&y).unwrap(), vec![6.0; 4]);
            loaded.push(one.kernels.modules.lock().unwrap().clone());
        }
        let (after_first, after_second) = (&loaded[0], &loaded[1]);
        assert!(!after_first.is_empty());
        let names: Vec<&str> = after_second.keys().copied().collect();
        assert_eq!(after_first.len(), after_second.len(), "{names:?}");
        for (file, module) in after_first {
            assert!(
                Arc::ptr_eq(module, &after_second[file]),
                "{file} loaded twice"
            );
        }
    }
}

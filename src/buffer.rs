//! Operand views the ops take: either device memory (cudarc slices and views)
//! or host memory for the host runtime. Ops check that every operand lives on
//! the backend of the device they run on.
use cudarc::driver::{CudaContext, CudaSlice, CudaView, CudaViewMut, DeviceSlice};

use crate::error::{Backend, Error, Result};

/// Where memory lives or an op runs: the host runtime, or one CUDA context
/// (by the address of its driver handle). Device memory is valid only in the
/// context that allocated it, so operands must share the device's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Home {
    Host,
    Cuda(usize),
}

impl Home {
    pub(crate) fn of_context(ctx: &CudaContext) -> Home {
        Home::Cuda(ctx.cu_ctx() as usize)
    }

    pub(crate) fn backend(self) -> Backend {
        match self {
            Home::Host => Backend::Host,
            Home::Cuda(_) => Backend::Cuda,
        }
    }
}

/// A read-only operand.
pub enum BufRef<'a, T> {
    /// Device memory (a cudarc view).
    Cuda(CudaView<'a, T>),
    /// Host memory, for the host runtime.
    Host(&'a [T]),
}

/// A written operand.
pub enum BufMut<'a, T> {
    /// Device memory (a cudarc view).
    Cuda(CudaViewMut<'a, T>),
    /// Host memory, for the host runtime.
    Host(&'a mut [T]),
}

impl<T> BufRef<'_, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            BufRef::Cuda(v) => v.len(),
            BufRef::Host(s) => s.len(),
        }
    }
    /// True when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Which backend the memory belongs to.
    pub fn backend(&self) -> Backend {
        self.home().backend()
    }
    pub(crate) fn home(&self) -> Home {
        match self {
            BufRef::Cuda(v) => Home::of_context(v.stream().context()),
            BufRef::Host(_) => Home::Host,
        }
    }
}

impl<T> BufMut<'_, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            BufMut::Cuda(v) => v.len(),
            BufMut::Host(s) => s.len(),
        }
    }
    /// True when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Which backend the memory belongs to.
    pub fn backend(&self) -> Backend {
        self.home().backend()
    }
    pub(crate) fn home(&self) -> Home {
        match self {
            BufMut::Cuda(v) => Home::of_context(v.stream().context()),
            BufMut::Host(_) => Home::Host,
        }
    }
}

/// Checks that `operand` (memory at `actual`) can be used by an op running
/// at `expected`: the same backend, and on CUDA the same context.
pub(crate) fn check_home(operand: &'static str, expected: Home, actual: Home) -> Result<()> {
    if expected.backend() != actual.backend() {
        return Err(Error::BackendMismatch {
            operand,
            expected: expected.backend(),
            actual: actual.backend(),
        });
    }
    if expected != actual {
        return Err(Error::ContextMismatch { operand });
    }
    Ok(())
}

impl<'a, T> From<&'a CudaSlice<T>> for BufRef<'a, T> {
    fn from(s: &'a CudaSlice<T>) -> Self {
        BufRef::Cuda(s.as_view())
    }
}
impl<'a, T> From<CudaView<'a, T>> for BufRef<'a, T> {
    fn from(v: CudaView<'a, T>) -> Self {
        BufRef::Cuda(v)
    }
}
impl<'a, T> From<&'a [T]> for BufRef<'a, T> {
    fn from(s: &'a [T]) -> Self {
        BufRef::Host(s)
    }
}
impl<'a, T> From<&'a Vec<T>> for BufRef<'a, T> {
    fn from(s: &'a Vec<T>) -> Self {
        BufRef::Host(s)
    }
}
impl<'a, T> From<&'a Buffer<T>> for BufRef<'a, T> {
    fn from(b: &'a Buffer<T>) -> Self {
        match b {
            Buffer::Cuda(s) => BufRef::Cuda(s.as_view()),
            Buffer::Host(v) => BufRef::Host(v),
        }
    }
}
impl<'a, T> From<&'a mut CudaSlice<T>> for BufMut<'a, T> {
    fn from(s: &'a mut CudaSlice<T>) -> Self {
        BufMut::Cuda(s.as_view_mut())
    }
}
impl<'a, T> From<CudaViewMut<'a, T>> for BufMut<'a, T> {
    fn from(v: CudaViewMut<'a, T>) -> Self {
        BufMut::Cuda(v)
    }
}
impl<'a, T> From<&'a mut [T]> for BufMut<'a, T> {
    fn from(s: &'a mut [T]) -> Self {
        BufMut::Host(s)
    }
}
impl<'a, T> From<&'a mut Vec<T>> for BufMut<'a, T> {
    fn from(s: &'a mut Vec<T>) -> Self {
        BufMut::Host(s)
    }
}
impl<'a, T> From<&'a mut Buffer<T>> for BufMut<'a, T> {
    fn from(b: &'a mut Buffer<T>) -> Self {
        match b {
            Buffer::Cuda(s) => BufMut::Cuda(s.as_view_mut()),
            Buffer::Host(v) => BufMut::Host(v),
        }
    }
}

/// An owned buffer on either backend (what [`crate::Device::upload`] returns).
#[derive(Debug)]
pub enum Buffer<T> {
    /// Device memory.
    Cuda(CudaSlice<T>),
    /// Host memory, for the host runtime.
    Host(Vec<T>),
}

impl<T> Buffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Buffer::Cuda(s) => s.len(),
            Buffer::Host(v) => v.len(),
        }
    }
    /// True when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` as a read-only operand (callers pass a range inside
    /// the buffer).
    #[cfg(feature = "peft")]
    pub(crate) fn view(&self, range: std::ops::Range<usize>) -> BufRef<'_, T> {
        match self {
            Buffer::Cuda(s) => BufRef::Cuda(s.slice(range)),
            Buffer::Host(v) => BufRef::Host(&v[range]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_of_another_context_or_backend_is_rejected() {
        let (one, two) = (Home::Cuda(0x1000), Home::Cuda(0x2000));
        assert!(check_home("x", one, one).is_ok());
        assert!(matches!(
            check_home("x", one, two),
            Err(Error::ContextMismatch { operand: "x" })
        ));
        assert!(matches!(
            check_home("y", Home::Host, one),
            Err(Error::BackendMismatch { operand: "y", .. })
        ));
    }
}

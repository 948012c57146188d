//! multi_adapter_forward: token ids and segments, Decode (split-K too), Prefill and SIMT, from one pool of mixed ranks.

use super::*;

/// The pool of the multi-adapter rows: mixed ranks (rank 1 among them) and an
/// empty last slot, which tokens may still name (they get the base model).
pub(super) const POOL_RANKS: [usize; 5] = [8, 1, 16, 3, 0];
pub(super) const POOL_MAX_RANK: usize = 16;

/// Per-token slot ids: repeats, -1, and the empty slot.
pub(super) fn token_ids(m: usize) -> Vec<i32> {
    (0..m).map(|i| [0, 2, -1, 1, 3, 4, 2][i % 7]).collect()
}

/// Sorted segments (offsets, slots): among them an empty segment, a -1
/// segment and one naming the empty slot.
fn segments(m: usize) -> (Vec<i32>, Vec<i32>) {
    // (slot, percent of the batch)
    let parts = [(2, 15), (1, 5), (-1, 20), (0, 0), (4, 10), (0, 30), (3, 20)];
    let mut offsets = vec![0];
    let mut done = 0;
    for (_, percent) in parts {
        done += percent;
        offsets.push((m * done / 100) as i32);
    }
    (offsets, parts.iter().map(|p| p.0).collect())
}

/// Ids as the reference takes them: the empty slot serves the base model
/// only, like -1.
pub(super) fn served(ids: &[i32]) -> Vec<i32> {
    ids.iter()
        .map(|&id| match id {
            id if id >= 0 && POOL_RANKS[id as usize] == 0 => -1,
            id => id,
        })
        .collect()
}

/// One adapter as host vectors: a, b, rank, scale.
pub(super) type HostAdapter<T> = (Vec<T>, Vec<T>, usize, f32);

/// The pool's adapters on the host (the empty slot has rank 0).
pub(super) struct PoolData<T> {
    pub(super) slots: Vec<HostAdapter<T>>,
    pub(super) n: usize,
    pub(super) k: usize,
}

impl<T: KernelElement> PoolData<T> {
    pub(super) fn new(n: usize, k: usize) -> Self {
        let slots = POOL_RANKS
            .iter()
            .zip(0u64..)
            .map(|(&r, s)| {
                let scale = if r > 0 { balanced_scale(r) } else { 0.0 };
                (data(r * k, 100 + s), data(n * r, 200 + s), r, scale)
            })
            .collect();
        PoolData { slots, n, k }
    }

    pub(super) fn config(&self) -> PoolConfig {
        PoolConfig {
            slots: POOL_RANKS.len(),
            max_rank: POOL_MAX_RANK,
            n: self.n,
            k: self.k,
        }
    }

    pub(super) fn load(&self, dev: &Device) -> Res<AdapterPool<T>> {
        let mut pool = AdapterPool::new(dev, self.config())?;
        for (s, (a, b, rank, scale)) in self.slots.iter().enumerate() {
            if *rank > 0 {
                pool.load(s, a, b, *rank, *scale)?;
            }
        }
        Ok(pool)
    }

    /// The occupied slots in f64 (absolute values when `absolute`), with
    /// their scales mapped by `scale`. The empty slot is the last, so ids
    /// index this list.
    pub(super) fn reference(
        &self,
        absolute: bool,
        scale: impl Fn(f32) -> f32,
    ) -> Vec<HostAdapter<f64>> {
        let values = |v: &[T]| if absolute { abs(v) } else { wide(v) };
        self.slots
            .iter()
            .filter(|s| s.2 > 0)
            .map(|(a, b, r, s)| (values(a), values(b), *r, scale(*s)))
            .collect()
    }

    pub(super) fn max_abs_b(&self) -> f64 {
        self.slots
            .iter()
            .map(|s| max_abs(&wide(&s.1)))
            .fold(0.0, f64::max)
    }
}

fn adapters(host: &[HostAdapter<f64>]) -> Vec<Adapter<'_, f64>> {
    host.iter()
        .map(|(a, b, rank, scale)| Adapter {
            a,
            b,
            rank: *rank,
            scale: *scale,
        })
        .collect()
}

pub(super) fn multi_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    for (regime, m) in [(Regime::Decode, M_DECODE), (Regime::Prefill, M_PREFILL)] {
        // Each routing with one load path, so both routings and both load
        // paths meet every regime and type.
        for (segmented, k) in [(false, K_ALIGNED), (true, K_ANY)] {
            rows.push(multi::<f16>(dev, regime, Dims::new(m, N, k), segmented)?);
            rows.push(multi::<bf16>(dev, regime, Dims::new(m, N, k), segmented)?);
        }
    }
    // Split-K at decode: 16 k-tiles (f16: 9, K_SPLIT_F16) over 2 columns of
    // tiles (a 64-row tile at 37 tokens, a 16-row one at 5), both load paths
    // and both routings.
    rows.push(multi::<bf16>(
        dev,
        Regime::Decode,
        Dims::new(M_DECODE, N, K_SPLIT),
        false,
    )?);
    rows.push(multi::<f16>(
        dev,
        Regime::Decode,
        Dims::new(M_SMALL, N, K_SPLIT_F16),
        true,
    )?);
    // The prefill's tile blocks on Hopper's wgmma and TMA (LaunchForm::wgmma),
    // where they run: the host runtime and GPUs of compute capability 9.0.
    if dev.compute_capability().is_none_or(|cc| cc == (9, 0)) {
        let wgmma = MultiLaunchForm {
            wgmma: Some(true),
            ..MultiLaunchForm::default()
        };
        let dims = Dims::new(M_PREFILL, N, K_ALIGNED);
        rows.push(multi_in::<bf16>(dev, Regime::Prefill, dims, false, wgmma)?);
        rows.push(multi_in::<f16>(dev, Regime::Prefill, dims, true, wgmma)?);
    }
    // Decode with w loaded straight into registers (LaunchForm::
    // direct_loads): split-K and a chunk's tail at k = 1000, one round of
    // chunks at 72; both routings.
    let direct = MultiLaunchForm {
        direct_loads: true,
        ..MultiLaunchForm::default()
    };
    let dims = Dims::new(M_SMALL, N, K_SPLIT);
    rows.push(multi_in::<bf16>(dev, Regime::Decode, dims, false, direct)?);
    let dims = Dims::new(M_SMALL, N, K_ALIGNED);
    rows.push(multi_in::<f16>(dev, Regime::Decode, dims, true, direct)?);
    Ok(rows)
}

/// The f32 multi-adapter forward (SIMT tiles), checked like the others: an
/// f32 hi + lo split is exact to 2^-48 and the path count is that of the
/// tensor-core kernels, so the same bound holds. A build whose op refused f32
/// would print why there is no row.
pub(super) fn multi_f32_rows(dev: &Device) -> Res<Vec<Row>> {
    let dims = Dims::new(M_DECODE, N, K_ANY);
    match multi::<f32>(dev, regime_for(DType::F32, dims.m), dims, false) {
        Ok(row) => Ok(vec![row]),
        Err(e) => match e.downcast_ref::<Error>() {
            Some(Error::InvalidArgument { name: "dtype", .. }) => {
                let op = "multi_adapter_forward";
                println!("   {op:<22} f32: no row yet, this build refuses f32 ({e})");
                Ok(Vec::new())
            }
            _ => Err(e),
        },
    }
}

/// One multi-adapter launch over the pool, routed by ids or by segments.
fn multi<T: KernelElement>(dev: &Device, regime: Regime, dims: Dims, segmented: bool) -> Res<Row> {
    multi_in::<T>(dev, regime, dims, segmented, MultiLaunchForm::default())
}

/// [`multi`] in a launch form other than the default (its tile blocks on
/// wgmma and TMA, or loading w straight into registers).
fn multi_in<T: KernelElement>(
    dev: &Device,
    regime: Regime,
    dims: Dims,
    segmented: bool,
    form: MultiLaunchForm,
) -> Res<Row> {
    let Dims { m, n, k } = dims;
    let (x, w) = (data::<T>(m * k, 11), data::<T>(n * k, 12));
    let pool_data = PoolData::<T>::new(n, k);
    let pool = pool_data.load(dev)?;
    let (xd, wd) = (dev.upload(&x)?, dev.upload(&w)?);
    let mut yd = dev.upload(&nans::<T>(m * n))?;
    let mut launch = |routing: &Routing<'_>| -> Res<()> {
        if form != MultiLaunchForm::default() {
            let (operands, outputs) = (((&xd).into(), (&wd).into()), ((&mut yd).into(), None));
            multi_adapter_forward_tuned(regime, form, &pool, m, operands, routing, 0.0, outputs)?;
        } else {
            multi_adapter_forward_in(regime, &pool, m, &xd, &wd, routing, 0.0, &mut yd)?;
        }
        Ok(())
    };
    let ids = if segmented {
        let (offsets, slots) = segments(m);
        let (od, sd) = (dev.upload(&offsets)?, dev.upload(&slots)?);
        let routing = Routing::Segments {
            offsets: (&od).into(),
            slots: (&sd).into(),
        };
        launch(&routing)?;
        reference::segment_ids(m, &offsets, &slots)?
    } else {
        let ids = token_ids(m);
        let idd = dev.upload(&ids)?;
        let routing = Routing::Tokens((&idd).into());
        launch(&routing)?;
        ids
    };

    let ids = served(&ids);
    let forward = |x: &[f64], w: &[f64], pool: &[HostAdapter<f64>]| -> Res<Vec<f64>> {
        let mut y = vec![0.0; m * n];
        reference::multi_adapter_forward(dims, x, w, &adapters(pool), &ids, 0.0, &mut y)?;
        Ok(y)
    };
    let (x64, w64, xa, wa) = (wide(&x), wide(&w), abs(&x), abs(&w));
    let want = forward(&x64, &w64, &pool_data.reference(false, |s| s))?;
    let control = forward(&x64, &w64, &pool_data.reference(false, off::<T>))?;
    let abs_all = forward(&xa, &wa, &pool_data.reference(true, f32::abs))?;
    let abs_low = minus(
        &abs_all,
        &forward(&xa, &wa, &pool_data.reference(true, |_| 0.0))?,
    );
    // A token's t: k additions (shuffle tree), then the scale, and the hi and
    // lo expands of its adapter (other adapters add exact zeros to its row).
    let model = model::<T>(k + 2 * POOL_MAX_RANK + 1)
        .mma(dev)
        .split::<T>(POOL_MAX_RANK as f64 * pool_data.max_abs_b());
    let routing = if segmented { "segments" } else { "token ids" };
    let path = if form.wgmma == Some(true) {
        format!("{regime:?}, {routing}, wgmma + TMA")
    } else if form.direct_loads {
        format!("{regime:?}, {routing}, direct loads")
    } else {
        format!("{regime:?}, {routing}, {}", loads(k % 8 == 0))
    };
    Ok(judged(
        label::<T>("multi_adapter_forward", path, shape(dims, "1-16")),
        &wide(&dev.download(&yd)?),
        &want,
        &control,
        &model.bounds(&want, &abs_all, &abs_low),
    ))
}

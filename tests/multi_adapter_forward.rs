//! The multi-adapter forward against the CPU reference, on the host runtime
//! (always) and the GPU (when there is one): random ids with repeats and -1s,
//! mixed ranks, empty slots, every regime (tensor-core decode and prefill for
//! f16/bf16, SIMT for f32), the segment form, empty batches, hot-swap, bad ids
//! on the device, a negative control per type, and the pool's own bookkeeping.
//! Every comparison uses docs/DESIGN.md section 3's per-element bound.
mod common;

use common::*;
use half::{bf16, f16};
use lora_kernels::ops::fused_forward::{Regime, regime_for};
use lora_kernels::ops::multi_adapter_forward::{
    Routing, check_segments, multi_adapter_forward, multi_adapter_forward_in,
};
use lora_kernels::reference::Adapter;
use lora_kernels::{AdapterPool, Device, Dims, Error, KernelElement, PoolConfig, reference};

/// One slot's adapter on the host: a, b, rank, scale.
type SlotWeights<T> = (Vec<T>, Vec<T>, usize, f32);

/// The host-side truth of a pool: `w`, and each slot's adapter (None = empty).
#[derive(Clone)]
struct Fixture<T> {
    cfg: PoolConfig,
    w: Vec<T>,
    slots: Vec<Option<SlotWeights<T>>>,
}

impl<T: KernelElement> Fixture<T> {
    /// `ranks[s] == 0` leaves slot s empty.
    fn new(n: usize, k: usize, max_rank: usize, ranks: &[usize], seed: u64) -> Self {
        let mut g = rng(seed);
        let cfg = PoolConfig {
            slots: ranks.len(),
            max_rank,
            n,
            k,
        };
        let slots = ranks
            .iter()
            .enumerate()
            .map(|(s, &r)| {
                (r > 0).then(|| {
                    (
                        random(&mut g, r * k),
                        random(&mut g, n * r),
                        r,
                        0.25 + s as f32 * 0.5,
                    )
                })
            })
            .collect();
        Fixture {
            cfg,
            w: random(&mut g, n * k),
            slots,
        }
    }

    fn pool(&self, dev: &Device) -> AdapterPool<T> {
        let mut pool = AdapterPool::new(dev, self.cfg).unwrap();
        for (s, adapter) in self.slots.iter().enumerate() {
            if let Some((a, b, r, scale)) = adapter {
                pool.load(s, a, b, *r, *scale).unwrap();
            }
        }
        pool
    }

    /// The reference result: ids of empty slots or out of range count as -1.
    fn expected(&self, x: &[T], ids: &[i32], beta: f32, y0: &[T]) -> Vec<T> {
        let dummy = (
            vec![T::default(); self.cfg.k],
            vec![T::default(); self.cfg.n],
        );
        let adapters: Vec<Adapter<'_, T>> = self
            .slots
            .iter()
            .map(|s| match s {
                Some((a, b, r, scale)) => Adapter {
                    a,
                    b,
                    rank: *r,
                    scale: *scale,
                },
                None => Adapter {
                    a: &dummy.0,
                    b: &dummy.1,
                    rank: 1,
                    scale: 0.0,
                },
            })
            .collect();
        let ids: Vec<i32> = ids
            .iter()
            .map(|&id| {
                if id >= 0 && (id as usize) < self.slots.len() && self.slots[id as usize].is_some()
                {
                    id
                } else {
                    -1
                }
            })
            .collect();
        let dims = Dims::new(ids.len(), self.cfg.n, self.cfg.k);
        let mut y = y0.to_vec();
        reference::multi_adapter_forward(dims, x, &self.w, &adapters, &ids, beta, &mut y).unwrap();
        y
    }

    /// The adapter token `id` gets: none for -1, an empty slot or a bad id.
    fn routed(&self, id: i32) -> Option<&SlotWeights<T>> {
        usize::try_from(id)
            .ok()
            .and_then(|s| self.slots.get(s))
            .and_then(Option::as_ref)
    }

    /// docs/DESIGN.md section 3's bound for each element of y
    /// ([`forward_bound`], each token with the adapter it is routed to).
    fn bound(&self, x: &[T], ids: &[i32], beta: f32, y0: &[T], want: &[T]) -> Vec<f64> {
        let adapters: Vec<Option<Adapter<'_, T>>> = ids
            .iter()
            .map(|&id| {
                self.routed(id).map(|(a, b, rank, scale)| Adapter {
                    a,
                    b,
                    rank: *rank,
                    scale: *scale,
                })
            })
            .collect();
        let dims = Dims::new(ids.len(), self.cfg.n, self.cfg.k);
        forward_bound(dims, x, &self.w, &adapters, beta, y0, want)
    }

    /// Compares a result with the reference under [`Fixture::bound`].
    fn compare(
        &self,
        what: &str,
        got: &[T],
        x: &[T],
        ids: &[i32],
        beta: f32,
        y0: &[T],
    ) -> Result<(), String> {
        let want = self.expected(x, ids, beta, y0);
        let bound = self.bound(x, ids, beta, y0, &want);
        compare_within(what, got, &want, &bound)
    }

    /// The same fixture with every adapter scale multiplied by `factor`.
    fn with_scales_times(&self, factor: f32) -> Self {
        let mut off = self.clone();
        for (_, _, _, scale) in off.slots.iter_mut().flatten() {
            *scale *= factor;
        }
        off
    }

    /// Runs the op with per-token ids on `dev` and compares with the reference.
    fn check(
        &self,
        dev: &Device,
        regime: Option<Regime>,
        x: &[T],
        ids: &[i32],
        beta: f32,
    ) -> Result<(), String> {
        let pool = self.pool(dev);
        let y0: Vec<T> = if beta == 0.0 {
            vec![T::from_f64(f64::NAN); x.len() / self.cfg.k * self.cfg.n]
        } else {
            random(
                &mut rng(ids.len() as u64),
                x.len() / self.cfg.k * self.cfg.n,
            )
        };
        let got = run(&pool, regime, x, &self.w, ids, beta, &y0).map_err(|e| e.to_string())?;
        let what = format!(
            "{:?} {regime:?} m={} {:?} beta={beta} ids={ids:?} on {}",
            T::DTYPE,
            ids.len(),
            self.cfg,
            dev.name()
        );
        self.compare(&what, &got, x, ids, beta, &y0)
    }
}

fn run<T: KernelElement>(
    pool: &AdapterPool<T>,
    regime: Option<Regime>,
    x: &[T],
    w: &[T],
    ids: &[i32],
    beta: f32,
    y0: &[T],
) -> lora_kernels::Result<Vec<T>> {
    let dev = pool.device();
    let (xd, wd, idd) = (dev.upload(x)?, dev.upload(w)?, dev.upload(ids)?);
    let mut y = dev.upload(y0)?;
    let routing = Routing::Tokens((&idd).into());
    match regime {
        Some(r) => multi_adapter_forward_in(r, pool, ids.len(), &xd, &wd, &routing, beta, &mut y)?,
        None => multi_adapter_forward(pool, ids.len(), &xd, &wd, &routing, beta, &mut y)?,
    }
    dev.download(&y)
}

type Spec = (usize, usize, usize, usize, Vec<usize>, Vec<i32>, bool, u64);

/// Pools of 1..6 slots (some empty, mixed ranks up to 70), batches of m
/// tokens with random ids, repeats and -1s.
fn spec(ms: std::ops::Range<usize>) -> impl Strategy<Value = Spec> {
    (
        ms,
        1usize..100,
        prop_oneof![1usize..90, (1usize..12).prop_map(|k| 8 * k)],
        prop_oneof![Just(1usize), 2usize..=70],
    )
        .prop_flat_map(|(m, n, k, max_rank)| {
            (
                Just(m),
                Just(n),
                Just(k),
                Just(max_rank),
                prop::collection::vec(prop_oneof![Just(0usize), 1..=max_rank], 1..6),
                any::<bool>(),
                any::<u64>(),
            )
        })
        .prop_flat_map(|(m, n, k, max_rank, ranks, beta, seed)| {
            let slots = ranks.len() as i32;
            (
                Just((m, n, k, max_rank, ranks, beta, seed)),
                prop::collection::vec(-1..slots, m),
            )
        })
        .prop_map(|((m, n, k, max_rank, ranks, beta, seed), ids)| {
            (m, n, k, max_rank, ranks, ids, beta, seed)
        })
}

fn check_spec<T: KernelElement>(
    regime: Option<Regime>,
    (m, n, k, max_rank, ranks, ids, beta, seed): Spec,
) -> Result<(), TestCaseError> {
    let fx = Fixture::<T>::new(n, k, max_rank, &ranks, seed);
    let x: Vec<T> = random(&mut rng(seed ^ 3), m * k);
    // Ids of empty slots are rejected from the host; route them to -1 here.
    let ids: Vec<i32> = ids
        .iter()
        .map(|&id| {
            if id >= 0 && ranks[id as usize] == 0 {
                -1
            } else {
                id
            }
        })
        .collect();
    for dev in devices() {
        fx.check(&dev, regime, &x, &ids, if beta { 0.5 } else { 0.0 })
            .map_err(TestCaseError::fail)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(12))]

    #[test]
    fn decode_matches_reference(s in spec(0..40), bf in any::<bool>()) {
        if bf { check_spec::<bf16>(Some(Regime::Decode), s)? } else { check_spec::<f16>(Some(Regime::Decode), s)? }
    }

    #[test]
    fn prefill_matches_reference(s in spec(1..150), bf in any::<bool>()) {
        if bf { check_spec::<bf16>(Some(Regime::Prefill), s)? } else { check_spec::<f16>(Some(Regime::Prefill), s)? }
    }

    #[test]
    fn simt_matches_reference(s in spec(0..100)) { check_spec::<f32>(Some(Regime::Simt), s)?; }

    /// The regime `regime_for` picks from m and the type.
    #[test]
    fn dispatch_matches_reference(s in spec(0..100), ty in 0u8..3) {
        match ty {
            0 => check_spec::<f32>(None, s)?,
            1 => check_spec::<f16>(None, s)?,
            _ => check_spec::<bf16>(None, s)?,
        }
    }
}

fn one_adapter_and_one_each<T: KernelElement>(regimes: &[Regime]) {
    let m = 24;
    let ranks: Vec<usize> = (0..m).map(|s| 1 + s % 17).collect();
    let fx = Fixture::<T>::new(40, 72, 17, &ranks, 5);
    let x: Vec<T> = random(&mut rng(6), m * 72);
    let same = vec![3i32; m];
    let each: Vec<i32> = (0..m as i32).rev().collect();
    for dev in devices() {
        for &regime in regimes {
            fx.check(&dev, Some(regime), &x, &same, 0.0).unwrap();
            fx.check(&dev, Some(regime), &x, &each, 0.0).unwrap();
        }
    }
}

#[test]
fn all_tokens_on_one_adapter_and_every_token_on_its_own() {
    one_adapter_and_one_each::<bf16>(&[Regime::Decode, Regime::Prefill]);
    one_adapter_and_one_each::<f32>(&[Regime::Simt]);
}

/// Segments route as the per-token ids they expand to (70 tokens: not a
/// multiple of any tile; an empty segment, a -1 segment, a rank-1 adapter,
/// an empty slot never named), with beta = 0 and beta != 0.
fn segments_case<T: KernelElement>() {
    let fx = Fixture::<T>::new(33, 40, 9, &[4, 9, 0, 1], 7);
    let m = 70;
    let x: Vec<T> = random(&mut rng(8), m * 40);
    let (offsets, slots) = (vec![0, 10, 10, 45, 70], vec![1, 0, -1, 3]);
    let ids = reference::segment_ids(m, &offsets, &slots).unwrap();
    for dev in devices() {
        let pool = fx.pool(&dev);
        check_segments(&pool, m, &offsets, &slots).unwrap();
        let (xd, wd) = (dev.upload(&x).unwrap(), dev.upload(&fx.w).unwrap());
        let (od, sd) = (dev.upload(&offsets).unwrap(), dev.upload(&slots).unwrap());
        let routing = Routing::Segments {
            offsets: (&od).into(),
            slots: (&sd).into(),
        };
        for beta in [0.0, -0.75] {
            let y0: Vec<T> = if beta == 0.0 {
                vec![T::from_f64(f64::NAN); m * 33]
            } else {
                random(&mut rng(9), m * 33)
            };
            let mut y = dev.upload(&y0).unwrap();
            multi_adapter_forward(&pool, m, &xd, &wd, &routing, beta, &mut y).unwrap();
            let got = dev.download(&y).unwrap();
            let what = format!("{:?} segments beta={beta} on {}", T::DTYPE, dev.name());
            fx.compare(&what, &got, &x, &ids, beta, &y0).unwrap();
        }
    }
    let pool = fx.pool(&Device::host().unwrap());
    assert!(matches!(
        check_segments(&pool, m, &offsets, &[1, 0, 2, 3]),
        Err(Error::EmptySlot { slot: 2, .. })
    ));
    assert!(matches!(
        check_segments(&pool, m, &[0, 5, 70], &[1, 0, 3]),
        Err(Error::Segments(_))
    ));
}

#[test]
fn segments_route_like_per_token_ids() {
    segments_case::<f16>();
    segments_case::<f32>();
}

/// Empty batches in both routing forms (per-token ids, a table of zero
/// segments), then launches in a row: the counters reset themselves.
fn empty_batch_and_repeats<T: KernelElement>() {
    let fx = Fixture::<T>::new(20, 16, 4, &[4, 2], 9);
    for dev in devices() {
        let pool = fx.pool(&dev);
        let (no_x, no_y) = (dev.upload::<T>(&[]).unwrap(), dev.upload::<T>(&[]).unwrap());
        assert!(
            run(&pool, None, &[], &fx.w, &[], 0.0, &[])
                .unwrap()
                .is_empty()
        );
        check_segments(&pool, 0, &[0], &[]).unwrap();
        let wd = dev.upload(&fx.w).unwrap();
        let (od, sd) = (
            dev.upload(&[0i32]).unwrap(),
            dev.upload::<i32>(&[]).unwrap(),
        );
        let routing = Routing::Segments {
            offsets: (&od).into(),
            slots: (&sd).into(),
        };
        let mut y = no_y;
        multi_adapter_forward(&pool, 0, &no_x, &wd, &routing, 0.0, &mut y).unwrap();
        multi_adapter_forward(&pool, 0, &no_x, &wd, &routing, 1.0, &mut y).unwrap();
        let x: Vec<T> = random(&mut rng(10), 5 * 16);
        let y0 = vec![T::from_f64(f64::NAN); 100];
        for i in 0..4 {
            let ids = [i % 2, -1, 1, 0, (i + 1) % 2];
            let got = run(&pool, None, &x, &fx.w, &ids, 0.0, &y0).unwrap();
            let what = format!("{:?} repeat {i} on {}", T::DTYPE, dev.name());
            fx.compare(&what, &got, &x, &ids, 0.0, &y0).unwrap();
        }
        // A table of zero segments for tokens that exist is refused (op and check).
        let xd = dev.upload(&x).unwrap();
        let mut y = dev.upload(&y0).unwrap();
        let err = multi_adapter_forward(&pool, 5, &xd, &wd, &routing, 0.0, &mut y).unwrap_err();
        assert!(matches!(err, Error::Segments(_)), "{err}");
        let err = check_segments(&pool, 5, &[0], &[]).unwrap_err();
        assert!(matches!(err, Error::Segments(_)), "{err}");
    }
}

#[test]
fn empty_batch_and_repeated_launches() {
    empty_batch_and_repeats::<bf16>();
    empty_batch_and_repeats::<f32>();
}

/// The reference takes an empty segment table for an empty batch, and refuses
/// one for tokens that exist.
#[test]
fn reference_segments_for_empty_batches() {
    assert_eq!(
        reference::segment_ids(0, &[0], &[]).unwrap(),
        Vec::<i32>::new()
    );
    let w = [0.5f32; 6];
    let mut y: [f32; 0] = [];
    reference::multi_adapter_forward_segments(
        Dims::new(0, 2, 3),
        &[],
        &w,
        &[],
        (&[0], &[]),
        0.0,
        &mut y,
    )
    .unwrap();
    for (m, offsets) in [(3, &[0][..]), (3, &[0, 3][..]), (0, &[][..])] {
        let err = reference::segment_ids(m, offsets, &[]).unwrap_err();
        assert!(matches!(err, Error::Segments(_)), "{err}");
    }
}

#[test]
fn hot_swap_changes_exactly_what_the_reference_says() {
    let fx = Fixture::<bf16>::new(30, 24, 8, &[3, 8, 5], 11);
    let x: Vec<bf16> = random(&mut rng(12), 6 * 24);
    let ids = [0, 1, 2, 1, -1, 0];
    for dev in devices() {
        let mut pool = fx.pool(&dev);
        let (xd, wd, idd) = (
            dev.upload(&x).unwrap(),
            dev.upload(&fx.w).unwrap(),
            dev.upload(&ids).unwrap(),
        );
        let routing = Routing::Tokens((&idd).into());
        let mut before = dev.upload(&vec![bf16::NAN; 6 * 30]).unwrap();
        multi_adapter_forward(&pool, 6, &xd, &wd, &routing, 0.0, &mut before).unwrap();
        // Replace slot 1 (new rank and weights) while that batch may still run.
        let (a, b) = (random(&mut rng(13), 2 * 24), random(&mut rng(14), 30 * 2));
        pool.load(1, &a, &b, 2, 3.0).unwrap();
        let mut after = dev.upload(&vec![bf16::NAN; 6 * 30]).unwrap();
        multi_adapter_forward(&pool, 6, &xd, &wd, &routing, 0.0, &mut after).unwrap();
        let (before, after) = (
            dev.download(&before).unwrap(),
            dev.download(&after).unwrap(),
        );
        let y0 = vec![bf16::NAN; 6 * 30];
        let mut swapped = fx.clone();
        swapped.slots[1] = Some((a, b, 2, 3.0));
        fx.compare("batch before the swap", &before, &x, &ids, 0.0, &y0)
            .unwrap();
        swapped
            .compare("batch after the swap", &after, &x, &ids, 0.0, &y0)
            .unwrap();
        assert_ne!(
            fx.expected(&x, &ids, 0.0, &y0),
            swapped.expected(&x, &ids, 0.0, &y0)
        );
        // Evicting slot 1 leaves its tokens with the base model only.
        pool.evict(1).unwrap();
        let evicted = run(&pool, None, &x, &fx.w, &ids, 0.0, &y0).unwrap();
        let base_ids: Vec<i32> = ids.iter().map(|&i| if i == 1 { -1 } else { i }).collect();
        swapped
            .compare("after evict", &evicted, &x, &base_ids, 0.0, &y0)
            .unwrap();
    }
}

fn bad_ids_case<T: KernelElement>(regimes: &[Regime]) {
    let fx = Fixture::<T>::new(25, 16, 4, &[4, 2, 3], 15);
    let x: Vec<T> = random(&mut rng(16), 6 * 16);
    let ids = [0, 99, -1, -7, 2, i32::MIN];
    let y0 = vec![T::from_f64(f64::NAN); 150];
    for dev in devices() {
        let pool = fx.pool(&dev);
        assert!(matches!(
            pool.check_ids(&ids),
            Err(Error::SlotOutOfRange {
                token: 1,
                id: 99,
                slots: 3
            })
        ));
        assert_eq!(pool.bad_id_count().unwrap(), 0);
        for &regime in regimes {
            fx.check(&dev, Some(regime), &x, &ids, 0.0).unwrap();
            // Each regime's shrink counts the 3 ids out of range (99, -7, MIN).
            let _ = run(&pool, Some(regime), &x, &fx.w, &ids, 0.0, &y0).unwrap();
            assert_eq!(pool.bad_id_count().unwrap(), 3, "{regime:?}");
            pool.reset_bad_id_count().unwrap();
        }
        let _ = run(&pool, None, &x, &fx.w, &ids, 0.0, &y0).unwrap();
        assert_eq!(pool.bad_id_count().unwrap(), 3);
        let _ = run(&pool, None, &x, &fx.w, &ids, 0.0, &y0).unwrap();
        assert_eq!(pool.bad_id_count().unwrap(), 6);
        pool.reset_bad_id_count().unwrap();
        assert_eq!(pool.bad_id_count().unwrap(), 0);
    }
}

#[test]
fn out_of_range_ids_on_the_device_are_served_as_base_and_counted() {
    bad_ids_case::<f16>(&[Regime::Decode, Regime::Prefill]);
    bad_ids_case::<f32>(&[Regime::Simt]);
}

#[test]
fn pool_bookkeeping_and_bad_input() {
    let dev = Device::host().unwrap();
    let cfg = PoolConfig {
        slots: 3,
        max_rank: 8,
        n: 10,
        k: 6,
    };
    let mut pool = AdapterPool::<bf16>::new(&dev, cfg).unwrap();
    assert_eq!((pool.slots_free(), pool.bytes_used()), (3, 0));
    assert_eq!(pool.bytes_allocated(), 3 * (8 * 16 * 2 + 8));
    let (a, b): (Vec<bf16>, Vec<bf16>) = (random(&mut rng(1), 4 * 6), random(&mut rng(2), 10 * 4));
    pool.load(2, &a, &b, 4, 1.0).unwrap();
    assert_eq!(
        (
            pool.slots_free(),
            pool.bytes_used(),
            pool.rank(2),
            pool.rank(0)
        ),
        (2, 4 * 16 * 2, Some(4), None)
    );
    assert!(matches!(
        pool.check_ids(&[-1, 2, 0]),
        Err(Error::EmptySlot { token: 2, slot: 0 })
    ));
    pool.check_ids(&[-1, 2, 2]).unwrap();

    let err = pool.load(3, &a, &b, 4, 1.0).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "slot", .. }),
        "{err}"
    );
    let big: Vec<bf16> = random(&mut rng(3), 9 * 6);
    let err = pool
        .load(0, &big, &random::<bf16>(&mut rng(4), 90), 9, 1.0)
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "rank", .. }),
        "{err}"
    );
    let err = pool.load(0, &a[1..], &b, 4, 1.0).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "a", .. }), "{err}");
    let err = pool.load(0, &a, &b, 4, f32::NAN).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "scale", .. }),
        "{err}"
    );
    for bad in [
        PoolConfig { slots: 0, ..cfg },
        PoolConfig { max_rank: 0, ..cfg },
        PoolConfig { n: 0, ..cfg },
    ] {
        assert!(AdapterPool::<bf16>::new(&dev, bad).is_err());
    }

    // Operand sizes, routing sizes and types are checked before any launch.
    let (x, w) = (
        random::<bf16>(&mut rng(5), 2 * 6),
        random::<bf16>(&mut rng(6), 60),
    );
    let mut y = vec![bf16::ZERO; 20];
    let ids = [2i32, -1, 2];
    let routing = Routing::Tokens((&ids[..]).into());
    let err = multi_adapter_forward(&pool, 2, &x, &w, &routing, 0.0, &mut y).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                operand: "slot_ids",
                ..
            }
        ),
        "{err}"
    );
    let routing = Routing::Tokens((&ids[..2]).into());
    let err = multi_adapter_forward(&pool, 2, &x, &w[1..], &routing, 0.0, &mut y).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "w", .. }), "{err}");
    // A table of zero segments is for an empty batch only.
    let (offsets, no_slots) = ([0i32], [0i32; 0]);
    let segments = Routing::Segments {
        offsets: (&offsets[..]).into(),
        slots: (&no_slots[..]).into(),
    };
    let err = multi_adapter_forward(&pool, 2, &x, &w, &segments, 0.0, &mut y).unwrap_err();
    assert!(matches!(err, Error::Segments(_)), "{err}");
    // Each type runs in its own regimes: tensor cores take no f32, and the
    // SIMT kernel is built for f32 only.
    let err = multi_adapter_forward_in(Regime::Simt, &pool, 2, &x, &w, &routing, 0.0, &mut y)
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "regime", .. }),
        "{err}"
    );
    let f32_pool = AdapterPool::<f32>::new(&dev, cfg).unwrap();
    let (xf, wf, mut yf) = (vec![0.5f32; 12], vec![0.5f32; 60], vec![0f32; 20]);
    for regime in [Regime::Decode, Regime::Prefill] {
        let err = multi_adapter_forward_in(regime, &f32_pool, 2, &xf, &wf, &routing, 0.0, &mut yf)
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: "regime", .. }),
            "{err}"
        );
    }
}

/// Real serving shapes on the GPU: 64 tokens, 64 distinct adapters of ranks
/// 8, 16 and 64, hidden 4096, checked on a sample of rows (bf16 on tensor
/// cores, f32 on SIMT tiles).
fn gpu_real_shapes<T: KernelElement>(dev: &Device) {
    let (n, k, m) = (4096, 4096, 64);
    let ranks: Vec<usize> = (0..m).map(|s| [8, 16, 64][s % 3]).collect();
    let fx = Fixture::<T>::new(n, k, 64, &ranks, 17);
    let x: Vec<T> = random(&mut rng(18), m * k);
    let ids: Vec<i32> = (0..m as i32)
        .map(|i| if i % 9 == 4 { -1 } else { (i * 7) % m as i32 })
        .collect();
    let pool = fx.pool(dev);
    let y0 = vec![T::from_f64(f64::NAN); m * n];
    let got = run(&pool, None, &x, &fx.w, &ids, 0.0, &y0).unwrap();
    for row in [0, 4, 31, 63] {
        fx.compare(
            &format!("{:?} row {row}", T::DTYPE),
            &got[row * n..(row + 1) * n],
            &x[row * k..(row + 1) * k],
            &ids[row..row + 1],
            0.0,
            &y0[..n],
        )
        .unwrap();
    }
}

#[test]
fn gpu_real_shapes_match_reference() {
    let Some(dev) = gpu() else { return };
    gpu_real_shapes::<bf16>(&dev);
    gpu_real_shapes::<f32>(&dev);
}

/// The training forward saves each token's t = x a^T (its own rank's columns,
/// f32 sums: the per-element bound over sum_k |x a|); every other entry of t
/// is left as it was. `m` picks the regime, and so the shrink: SIMT units of
/// one token at decode, tensor-core units of 16 tokens at prefill. Each case
/// runs twice: as launched, and with no shrink blocks (the tile blocks then
/// take every shrink item, in their lean forms).
fn saving_t_case<T: KernelElement>(m: usize, (n, k): (usize, usize), ranks: &[usize], ids: &[i32]) {
    use lora_kernels::ops::multi_adapter_forward::{
        LaunchForm, multi_adapter_forward_saving_t, multi_adapter_forward_tuned,
    };
    let max_rank = *ranks.iter().max().unwrap();
    let fx = Fixture::<T>::new(n, k, max_rank, ranks, 31 + k as u64);
    let x: Vec<T> = random(&mut rng(32), m * k);
    const UNTOUCHED: f32 = 7.0;
    for (dev, shrink_blocks) in devices()
        .into_iter()
        .flat_map(|d| [(d.clone(), true), (d, false)])
    {
        let pool = fx.pool(&dev);
        let (xd, wd, idd) = (
            dev.upload(&x).unwrap(),
            dev.upload(&fx.w).unwrap(),
            dev.upload(ids).unwrap(),
        );
        let y0 = vec![T::from_f64(f64::NAN); m * n];
        let mut y = dev.upload(&y0).unwrap();
        let mut t = dev.upload(&vec![UNTOUCHED; m * max_rank]).unwrap();
        let routing = Routing::Tokens((&idd).into());
        if shrink_blocks {
            multi_adapter_forward_saving_t(&pool, m, &xd, &wd, &routing, &mut y, &mut t)
        } else {
            let regime = regime_for(T::DTYPE, m);
            let form = LaunchForm {
                shrink_blocks: false,
                ..LaunchForm::default()
            };
            let (operands, outputs) = (
                ((&xd).into(), (&wd).into()),
                ((&mut y).into(), Some((&mut t).into())),
            );
            multi_adapter_forward_tuned(regime, form, &pool, m, operands, &routing, 0.0, outputs)
        }
        .unwrap();
        let t = dev.download(&t).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let row = &t[i * max_rank..(i + 1) * max_rank];
            let Some((a, b, r, scale)) = fx.routed(id) else {
                assert!(
                    row.iter().all(|&v| v == UNTOUCHED),
                    "t of token {i}: {row:?}"
                );
                continue;
            };
            let adapter = Adapter {
                a,
                b,
                rank: *r,
                scale: *scale,
            };
            let xi = &x[i * k..(i + 1) * k];
            let want = reference::lora_intermediate(Dims::new(1, n, k), xi, &adapter).unwrap();
            let bound: Vec<f64> = (0..*r)
                .map(|j| {
                    let abs_sum = xi
                        .iter()
                        .zip(&a[j * k..(j + 1) * k])
                        .map(|(p, q)| (p.to_f64() * q.to_f64()).abs())
                        .sum();
                    f32_sum_bound::<f32>(want[j] as f64, abs_sum)
                })
                .collect();
            let what = format!(
                "{:?} m={m} k={k} shrink blocks {shrink_blocks}: t of token {i} on {}",
                T::DTYPE,
                dev.name()
            );
            compare_within(&what, &row[..*r], &want, &bound).unwrap();
            assert!(row[*r..].iter().all(|&v| v == UNTOUCHED), "{what}: {row:?}");
        }
        let what = format!(
            "{:?} m={m} k={k} shrink blocks {shrink_blocks}: y on {}",
            T::DTYPE,
            dev.name()
        );
        fx.compare(&what, &dev.download(&y).unwrap(), &x, ids, 0.0, &y0)
            .unwrap();
    }
}

#[test]
fn forward_saving_t_matches_the_reference_intermediate() {
    let ids: Vec<i32> = (0..20).map(|i| [0, 1, -1, 3, 1][i % 5]).collect();
    saving_t_case::<bf16>(20, (30, 24), &[3, 9, 0, 1], &ids);
    saving_t_case::<f32>(20, (30, 24), &[3, 9, 0, 1], &ids);
}

/// A few tokens make few SIMT shrink units, so each is cut into chunks of
/// `k` (whole 1024-value pieces, an item each) whose sums the unit's last
/// chunk adds up: `t` and `y` match the reference with and without shrink
/// blocks (the tile blocks' lean forms). On 132 SMs (the host runtime's
/// count): k = 1000 one chunk; 2050 three (element loads, the last piece
/// cut short); 5000 four chunks over five pieces (one takes two); 6144 six.
/// Ranks 1, 3, 16 and 64, tokens without an adapter; f32 takes the same
/// units (element loads).
#[test]
fn decode_shrink_cuts_k_into_chunks() {
    let ranks = [16, 1, 0, 64, 3];
    for (m, k) in [(1, 1000), (3, 2050), (7, 5000), (2, 6144)] {
        let ids: Vec<i32> = (0..m).map(|i| [3, 0, -1, 1, 4, 2, 3][i % 7]).collect();
        saving_t_case::<bf16>(m, (40, k), &ranks, &ids);
        saving_t_case::<f16>(m, (40, k), &ranks, &ids);
    }
    let ids = [3, 4, -1];
    saving_t_case::<f32>(3, (40, 2050), &ranks, &ids);
    // Launches one after another on one pool, each with new tokens: every
    // launch's last chunks find their counters back at 0 (else t would keep
    // the previous launch's values).
    let fx = Fixture::<bf16>::new(40, 6144, 64, &ranks, 8);
    for dev in devices() {
        let pool = fx.pool(&dev);
        for seed in 0..3 {
            let x: Vec<bf16> = random(&mut rng(seed), 2 * 6144);
            let (ids, y0) = ([3, 0], vec![bf16::NAN; 80]);
            let got = run(&pool, Some(Regime::Decode), &x, &fx.w, &ids, 0.0, &y0).unwrap();
            let what = format!("launch {seed} on {}", dev.name());
            fx.compare(&what, &got, &x, &ids, 0.0, &y0).unwrap();
        }
    }
}

/// The prefill shrink's units of 16 tokens and 32 ranks: 90 tokens (the
/// last unit has 10), a run of one adapter across a unit's edge, units with
/// six distinct adapters and with none, ranks 1, 3, 16, 40 and 70 (one to
/// three units of 32 ranks), k = 72 (16-byte loads, a k-step of 32 cut at
/// 8), k = 200 (16-byte loads, two groups of 3 k-steps whose loads go
/// together, and a third cut at 8) and k = 45 (element loads, cut inside a
/// 16-byte chunk).
#[test]
fn prefill_shrink_serves_each_adapter_of_a_16_token_unit() {
    let ranks = [3, 40, 0, 1, 70, 16];
    let ids: Vec<i32> = (0..90)
        .map(|i| match i {
            0..=19 => 4,
            20..=47 => [0, 1, -1, 3, 4, 5, 1][i % 7],
            48..=63 => -1,
            _ => [5, 5, 1, 0][i % 4],
        })
        .collect();
    for k in [72, 200, 45] {
        saving_t_case::<bf16>(90, (30, k), &ranks, &ids);
        saving_t_case::<f16>(90, (30, k), &ranks, &ids);
    }
}

/// A prefill shrink unit's passes (one per distinct adapter among its 16
/// tokens) cut into shares, an item each (`LaunchForm::shrink_shares`):
/// every count from 1 to 16 gives `t` and `y` the same bits as one share,
/// with and without shrink blocks (the tile blocks then take every share in
/// their lean forms), `y` within its bound and a reference with scales off
/// by 1% (bf16) or 0.3% (f16) failing, and the launch's out-of-range ids
/// counted once each, not once per share. 40 tokens: a unit of 16 distinct
/// adapters, one of repeats, -1 and 99, and a last unit of 8; ranks 1 to
/// 70 (up to three units of 32 ranks); k on the 16-byte path and off it.
/// A count outside 1..=16, or at decode, is an error naming
/// `shrink_shares` that changes nothing.
#[test]
fn prefill_shrink_shares_give_the_same_bits_as_one() {
    use lora_kernels::ops::multi_adapter_forward::{LaunchForm, multi_adapter_forward_tuned};
    fn check<T: KernelElement>(dev: &Device, k: usize, off: f32) {
        let ranks: Vec<usize> = (0..18).map(|s| [16, 1, 70, 8, 33, 0][s % 6]).collect();
        let fx = Fixture::<T>::new(45, k, 70, &ranks, k as u64);
        let pool = fx.pool(dev);
        let (m, n) = (40, 45);
        let ids: Vec<i32> = (0..m as i32)
            .map(|i| match i {
                0..=15 => (i * 7) % 17, // 16 distinct, slot 5 empty
                16..=31 => [2, -1, 2, 99, 4, 4, 2, 9][i as usize % 8], // repeats
                _ => [13, 1, 13, 16, -1, 2, 14, 1][i as usize % 8],
            })
            .collect();
        let bad = ids.iter().filter(|&&id| id == 99).count() as u32;
        let x: Vec<T> = random(&mut rng(k as u64 + 1), m * k);
        let y0: Vec<T> = random(&mut rng(2), m * n);
        let (xd, wd, idd) = (
            dev.upload(&x).unwrap(),
            dev.upload(&fx.w).unwrap(),
            dev.upload(&ids).unwrap(),
        );
        let routing = Routing::Tokens((&idd).into());
        let launch = |form: LaunchForm| {
            let mut y = dev.upload(&y0).unwrap();
            let mut t = dev.upload(&vec![f32::NAN; m * 70]).unwrap();
            let (operands, outputs) = (
                ((&xd).into(), (&wd).into()),
                ((&mut y).into(), Some((&mut t).into())),
            );
            let done = multi_adapter_forward_tuned(
                Regime::Prefill,
                form,
                &pool,
                m,
                operands,
                &routing,
                0.5,
                outputs,
            );
            (done, dev.download(&y).unwrap(), dev.download(&t).unwrap())
        };
        let form = |shrink_shares, shrink_blocks| LaunchForm {
            shrink_shares,
            shrink_blocks,
            ..LaunchForm::default()
        };
        let (done, y1, t1) = launch(form(Some(1), true));
        done.unwrap();
        let what = format!("{:?} k={k} one share on {}", T::DTYPE, dev.name());
        fx.compare(&what, &y1, &x, &ids, 0.5, &y0).unwrap();
        let off_fx = fx.with_scales_times(1.0 + off);
        assert!(
            off_fx.compare(&what, &y1, &x, &ids, 0.5, &y0).is_err(),
            "{what}: the control must fail"
        );
        assert_eq!(pool.bad_id_count().unwrap(), bad, "{what}");
        pool.reset_bad_id_count().unwrap();
        let counts = [None, Some(2), Some(3), Some(5), Some(15), Some(16)];
        for (shares, shrink_blocks) in counts.into_iter().flat_map(|s| [(s, true), (s, false)]) {
            let what = format!(
                "{:?} k={k} shares {shares:?} shrink blocks {shrink_blocks} on {}",
                T::DTYPE,
                dev.name()
            );
            let (done, y, t) = launch(form(shares, shrink_blocks));
            done.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(same_bits(&y, &y1), "{what}: y differs from one share's");
            assert!(same_bits(&t, &t1), "{what}: t differs from one share's");
            assert_eq!(pool.bad_id_count().unwrap(), bad, "{what}");
            pool.reset_bad_id_count().unwrap();
        }
        for shares in [0, 17] {
            let (done, y, _) = launch(form(Some(shares), true));
            assert_refused(done, &y, &y0, "shrink_shares");
        }
        let decode = form(Some(2), true);
        let (done, y) = run_form(
            &pool,
            Regime::Decode,
            decode,
            &x[..4 * k],
            &fx.w,
            &ids[..4],
            0.5,
            &y0[..4 * n],
        );
        assert_refused(done, &y, &y0[..4 * n], "shrink_shares");
    }
    for dev in devices() {
        for k in [200, 45] {
            check::<bf16>(&dev, k, 0.01);
            check::<f16>(&dev, k, 0.003);
        }
    }
}

/// The op in a launch form: what it returned, and `y` (from `y0`) after it.
#[allow(clippy::too_many_arguments)] // a fixture's launch, spelled out
fn run_form<T: KernelElement>(
    pool: &AdapterPool<T>,
    regime: Regime,
    form: lora_kernels::ops::multi_adapter_forward::LaunchForm,
    x: &[T],
    w: &[T],
    ids: &[i32],
    beta: f32,
    y0: &[T],
) -> (lora_kernels::Result<()>, Vec<T>) {
    use lora_kernels::ops::multi_adapter_forward::multi_adapter_forward_tuned;
    let dev = pool.device();
    let upload = |v| dev.upload(v).unwrap();
    let (xd, wd, idd, mut y) = (upload(x), upload(w), dev.upload(ids).unwrap(), upload(y0));
    let routing = Routing::Tokens((&idd).into());
    let operands = ((&xd).into(), (&wd).into());
    let outputs = ((&mut y).into(), None);
    let done = multi_adapter_forward_tuned(
        regime,
        form,
        pool,
        ids.len(),
        operands,
        &routing,
        beta,
        outputs,
    );
    (done, dev.download(&y).unwrap())
}

/// Runs each of `forms` in `regime` on a pool of ranks 1 to 64 and an empty
/// slot, with tokens on every slot, -1 and an out-of-range id (99): `y`
/// within its per-element bound, the same bits on a second launch, the bad
/// id counted once per launch; with `off`, a reference whose scales are off
/// by that factor fails.
fn check_forms<T: KernelElement>(
    dev: &Device,
    regime: Regime,
    (m, n, k): (usize, usize, usize),
    beta: f32,
    forms: &[lora_kernels::ops::multi_adapter_forward::LaunchForm],
    off: Option<f32>,
) {
    let ranks = [16, 1, 0, 64, 3];
    let fx = Fixture::<T>::new(n, k, 64, &ranks, (m * n + k) as u64);
    let x: Vec<T> = random(&mut rng(k as u64), m * k);
    let ids: Vec<i32> = (0..m).map(|i| [3, 0, -1, 99, 1, 4, 3, 2][i % 8]).collect();
    let bad = ids.iter().filter(|&&id| id == 99).count() as u32;
    let y0: Vec<T> = match beta {
        0.0 => vec![T::from_f64(f64::NAN); m * n],
        _ => random(&mut rng(3), m * n),
    };
    let pool = fx.pool(dev);
    for &form in forms {
        let what = format!(
            "{:?} m={m} n={n} k={k} beta={beta} {form:?} on {}",
            T::DTYPE,
            dev.name()
        );
        let run = || run_form(&pool, regime, form, &x, &fx.w, &ids, beta, &y0);
        let (done, got) = run();
        done.unwrap_or_else(|e| panic!("{what}: {e}"));
        fx.compare(&what, &got, &x, &ids, beta, &y0).unwrap();
        if let Some(off) = off {
            let off_fx = fx.with_scales_times(1.0 + off);
            assert!(
                off_fx.compare(&what, &got, &x, &ids, beta, &y0).is_err(),
                "{what}: a reference with scales off by {off} must fail"
            );
        }
        let (again_done, again) = run();
        again_done.unwrap();
        assert!(same_bits(&got, &again), "{what}: a second launch differs");
        assert_eq!(pool.bad_id_count().unwrap(), 2 * bad, "{what}");
        pool.reset_bad_id_count().unwrap();
    }
}

/// Split-K at decode: the tile blocks of a tile each sum their range of k,
/// and the last to finish adds the ranges up in split order, then alone
/// waits for the shrink and expands. Every split count, with and without
/// shrink blocks (the last blocks then take every shrink item), gives `y`
/// within its per-element bound and the same bits on a second run (the
/// counters are back at 0), `y` is written once (NaN with beta 0), and every
/// block, split or not, counts in: the launch's out-of-range id (99) is
/// counted once per launch. Shapes: one and several row tiles, k on and off
/// the 16-byte path and off the 64-wide k-tile, ranges of unequal length,
/// ranks 1 to 64 and empty slots, n off the 32-column tile; the default
/// tiles of m and the other ones (64 rows up to 16 tokens, 16 rows past).
/// Forced counts the launch can't take are errors that change nothing.
#[test]
fn decode_split_k_matches_reference_for_every_split_count() {
    use lora_kernels::ops::multi_adapter_forward::LaunchForm;
    fn check<T: KernelElement>(dev: &Device, (m, n, k): (usize, usize, usize), beta: f32) {
        let ktiles = k.div_ceil(64);
        let other_tiles = Some(m <= 16);
        let forms: Vec<LaunchForm> = [None, Some(1), Some(2), Some(3), Some(ktiles.min(8))]
            .into_iter()
            .flat_map(|k_splits| {
                [(true, None), (false, None), (true, other_tiles)].map(
                    |(shrink_blocks, wide_tiles)| LaunchForm {
                        shrink_blocks,
                        k_splits,
                        wide_tiles,
                        ..LaunchForm::default()
                    },
                )
            })
            .collect();
        check_forms::<T>(dev, Regime::Decode, (m, n, k), beta, &forms, None);
    }
    for dev in devices() {
        for (shape, beta) in [
            ((1, 70, 840), 0.0),
            ((16, 96, 1000), 0.5),
            ((5, 40, 2050), 0.0),
            ((40, 33, 777), 0.5),
        ] {
            check::<bf16>(&dev, shape, beta);
            check::<f16>(&dev, shape, beta);
        }
    }

    // Counts past the k-tiles (14) or one block per SM (64 tokens on 16-row
    // tiles: 12 tiles), a split of the wgmma prefill, and 0: errors naming
    // k_splits, y unchanged.
    let host = Device::host().unwrap();
    let fx = Fixture::<bf16>::new(70, 840, 16, &[16], 5);
    let pool = fx.pool(&host);
    for (m, splits, regime, wide_tiles, wgmma) in [
        (1, 15, Regime::Decode, None, false),
        (1, 0, Regime::Decode, None, false),
        (64, 12, Regime::Decode, Some(false), false),
        (100, 2, Regime::Prefill, None, true),
    ] {
        let x: Vec<bf16> = random(&mut rng(6), m * 840);
        let y0: Vec<bf16> = random(&mut rng(7), m * 70);
        let form = LaunchForm {
            k_splits: Some(splits),
            wide_tiles,
            wgmma: Some(wgmma),
            ..LaunchForm::default()
        };
        let (done, y) = run_form(&pool, regime, form, &x, &fx.w, &vec![0; m], 0.5, &y0);
        assert_refused(done, &y, &y0, "k_splits");
    }
}

/// Split-K at prefill (the mma.sync tiles of 128 x 128): a batch of a few
/// hundred tokens has fewer tiles than SMs, so each tile's k-loop is split
/// as at decode. Every split count, with and without shrink blocks, gives
/// `y` within its per-element bound and the same bits on a second run, and
/// the launch's bad id counted once; a reference with scales off by 1%
/// (bf16) or 0.3% (f16) fails. Shapes: one tile and several (two row tiles,
/// the second partial; n off the tile), k on and off the 16-byte path and
/// off the 32-wide k-tile, ranges of unequal length, beta 0 and 0.5.
#[test]
fn prefill_split_k_matches_reference_for_every_split_count() {
    use lora_kernels::ops::multi_adapter_forward::LaunchForm;
    fn check<T: KernelElement>(
        dev: &Device,
        (m, n, k): (usize, usize, usize),
        beta: f32,
        off: f32,
    ) {
        let ktiles = k.div_ceil(32);
        let forms: Vec<LaunchForm> = [None, Some(1), Some(2), Some(3), Some(ktiles.min(8))]
            .into_iter()
            .flat_map(|k_splits| {
                [true, false].map(|shrink_blocks| LaunchForm {
                    shrink_blocks,
                    k_splits,
                    ..LaunchForm::default()
                })
            })
            .collect();
        check_forms::<T>(dev, Regime::Prefill, (m, n, k), beta, &forms, Some(off));
    }
    for dev in devices() {
        for (shape, beta) in [
            ((70, 45, 840), 0.0),
            ((150, 200, 1000), 0.5),
            ((65, 130, 101), 0.5),
        ] {
            check::<bf16>(&dev, shape, beta, 0.01);
            check::<f16>(&dev, shape, beta, 0.003);
        }
    }
}

/// A call refused with an error naming `name`, and `y` as it was.
fn assert_refused<T: KernelElement>(done: lora_kernels::Result<()>, y: &[T], y0: &[T], name: &str) {
    let err = done.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name: got, .. } if *got == name),
        "{err}: not about {name}"
    );
    assert!(same_bits(y, y0), "{err}: y changed");
}

/// Decode tiles of 16 rows and of 64 (the default past 16 tokens: one block
/// covers 64 rows and reads each column tile of `w` once; each warp packs
/// and expands its own 16 rows' adapters). Both forms at 5 tokens (a 64-row
/// tile of 5 rows), 17, 33, 64 and 100 (two row tiles of 64, the second
/// partial), with 40 adapters of ranks 1 to 80 and tokens without one, so a
/// warp's rows take several packed steps: `y` within its bound, the same
/// bits on a second run, and a reference with scales off by 1% (bf16) or
/// 0.3% (f16) fails. Both load paths; also with the host runtime's warps
/// taking turns (a warp's packing state or tiles reaching another warp shows
/// there). Forcing a tile choice outside decode is an error naming
/// `wide_tiles` that changes nothing.
#[test]
fn decode_tiles_of_16_and_64_rows_match_reference() {
    use lora_kernels::ops::multi_adapter_forward::LaunchForm;
    fn check<T: KernelElement>(dev: &Device, m: usize, k: usize, off: f32) {
        let ranks: Vec<usize> = (0..40).map(|s| 1 + (s * 37) % 80).collect();
        let fx = Fixture::<T>::new(45, k, 80, &ranks, (m + k) as u64);
        let x: Vec<T> = random(&mut rng(m as u64), m * k);
        let ids: Vec<i32> = (0..m)
            .map(|i| {
                if i % 9 == 4 {
                    -1
                } else {
                    ((i * 7) % 40) as i32
                }
            })
            .collect();
        let y0 = vec![T::from_f64(f64::NAN); m * 45];
        let pool = fx.pool(dev);
        let off_fx = fx.with_scales_times(1.0 + off);
        for wide in [false, true] {
            let form = LaunchForm {
                wide_tiles: Some(wide),
                ..LaunchForm::default()
            };
            let what = format!("{:?} m={m} k={k} wide={wide} on {}", T::DTYPE, dev.name());
            let run = || run_form(&pool, Regime::Decode, form, &x, &fx.w, &ids, 0.0, &y0);
            let (done, got) = run();
            done.unwrap();
            fx.compare(&what, &got, &x, &ids, 0.0, &y0).unwrap();
            let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&run().1), bits(&got), "{what}: a second run");
            off_fx
                .compare(&what, &got, &x, &ids, 0.0, &y0)
                .expect_err("a reference with scales off must fail the check");
        }
    }
    for dev in devices_and_interleaved() {
        for (m, k) in [(5, 72), (17, 70), (33, 72), (64, 72), (100, 70)] {
            check::<bf16>(&dev, m, k, 1e-2);
            check::<f16>(&dev, m, k, 3e-3);
        }
    }

    let host = Device::host().unwrap();
    let fx = Fixture::<bf16>::new(45, 72, 16, &[16], 5);
    let pool = fx.pool(&host);
    let f32_fx = Fixture::<f32>::new(45, 72, 16, &[16], 5);
    let f32_pool = f32_fx.pool(&host);
    for wide in [false, true] {
        let form = LaunchForm {
            wide_tiles: Some(wide),
            ..LaunchForm::default()
        };
        let x: Vec<bf16> = random(&mut rng(6), 100 * 72);
        let y0: Vec<bf16> = random(&mut rng(7), 100 * 45);
        let (done, y) = run_form(&pool, Regime::Prefill, form, &x, &fx.w, &[0; 100], 0.5, &y0);
        let x32: Vec<f32> = random(&mut rng(6), 20 * 72);
        let y32: Vec<f32> = random(&mut rng(7), 20 * 45);
        let (done32, y_32) = run_form(
            &f32_pool,
            Regime::Simt,
            form,
            &x32,
            &f32_fx.w,
            &[0; 20],
            0.5,
            &y32,
        );
        for (err, unchanged) in [
            (
                done.unwrap_err(),
                y.iter().zip(&y0).all(|(p, q)| p.to_bits() == q.to_bits()),
            ),
            (
                done32.unwrap_err(),
                y_32.iter()
                    .zip(&y32)
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
            ),
        ] {
            assert!(unchanged, "{err}: y changed");
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        name: "wide_tiles",
                        ..
                    }
                ),
                "{err}"
            );
        }
    }
}

/// Negative control, per type: the same check against a reference whose
/// scales are off by `off` (1% bf16, 0.3% f16, 0.01% f32, docs/DESIGN.md section
/// 3) must fail, so the bound is tight enough to see a wrong low-rank term.
/// The data make the low-rank term as large as the base term.
fn negative_control<T: KernelElement>(regime: Regime, off: f32) {
    let (n, k, m) = (37, 45, 19);
    let fx = Fixture::<T>::new(n, k, 12, &[12, 1, 7], 51);
    let x: Vec<T> = random(&mut rng(52), m * k);
    let ids: Vec<i32> = (0..m as i32).map(|i| i % 3).collect();
    let y0 = vec![T::from_f64(f64::NAN); m * n];
    let off_fx = fx.with_scales_times(1.0 + off);
    for dev in devices() {
        let got = run(&fx.pool(&dev), Some(regime), &x, &fx.w, &ids, 0.0, &y0).unwrap();
        let what = format!("{:?} {regime:?} on {}", T::DTYPE, dev.name());
        fx.compare(&what, &got, &x, &ids, 0.0, &y0).unwrap();
        // Scales off by `off` change y by about `off` times the low-rank term.
        let err = off_fx
            .compare(&what, &got, &x, &ids, 0.0, &y0)
            .expect_err("a reference with scales off must fail the check");
        eprintln!(
            "negative control {:?}, scales x (1 + {off}): {err}",
            T::DTYPE
        );
        // The terms really are of one order (so the control tests the adapter path).
        let (lora, base) = term_sizes(&fx, &x, &ids, &y0);
        assert!(lora > 0.5 * base && lora < 2.0 * base, "{lora} vs {base}");
    }
}

/// RMS of the low-rank term and of the base term over a batch.
fn term_sizes<T: KernelElement>(fx: &Fixture<T>, x: &[T], ids: &[i32], y0: &[T]) -> (f64, f64) {
    let full = fx.expected(x, ids, 0.0, y0);
    let base = fx.expected(x, &vec![-1; ids.len()], 0.0, y0);
    let rms = |v: &mut dyn Iterator<Item = f64>| {
        let (sum, count) = v.fold((0.0, 0), |(s, c), e| (s + e * e, c + 1));
        (sum / count as f64).sqrt()
    };
    let lora = rms(&mut full.iter().zip(&base).map(|(f, b)| f.to_f64() - b.to_f64()));
    (lora, rms(&mut base.iter().map(|b| b.to_f64())))
}

#[test]
fn negative_control_per_type() {
    negative_control::<f32>(Regime::Simt, 1e-4);
    negative_control::<f16>(Regime::Decode, 3e-3);
    negative_control::<f16>(Regime::Prefill, 3e-3);
    negative_control::<bf16>(Regime::Decode, 1e-2);
    negative_control::<bf16>(Regime::Prefill, 1e-2);
}

/// A pool whose slot 1 has scale 2^30 and a b small enough (2^-21 times
/// uniform, subnormal in f16) to keep y finite: its tokens' |s t| reaches
/// about 2^33, far above f16's 65504 (docs/DESIGN.md section 2), so their
/// rows are split scaled by about 2^19; the other slots are ordinary. Ranks 13, 70 (two rank chunks) and 5; 72 inputs, 45 outputs (off every
/// tile).
fn huge_scale_fixture() -> Fixture<f16> {
    let mut fx = Fixture::<f16>::new(45, 72, 70, &[13, 70, 5], 61);
    let (_, b, _, scale) = fx.slots[1].as_mut().unwrap();
    *scale = 2f32.powi(30);
    for v in b.iter_mut() {
        *v = f16::from_f64(v.to_f64() * 2f64.powi(-21));
    }
    fx
}

/// Ids for m tokens: slot 1 on every third token, the others on 0, 2 and -1.
fn huge_scale_ids(m: usize) -> Vec<i32> {
    (0..m)
        .map(|i| if i % 3 == 1 { 1 } else { [0, 2, -1][i % 4 % 3] })
        .collect()
}

#[test]
fn f16_pool_slot_with_a_huge_scale_matches_reference() {
    let fx = huge_scale_fixture();
    let off_fx = fx.with_scales_times(1.003);
    for (regime, m) in [(Regime::Decode, 21), (Regime::Prefill, 150)] {
        let x: Vec<f16> = random(&mut rng(62), m * 72);
        let ids = huge_scale_ids(m);
        // The case really needs the range: some |s t| of slot 1 is above 65504.
        let (a, _, rank, scale) = fx.slots[1].as_ref().unwrap();
        let t = reference::lora_intermediate(
            Dims::new(m, 45, 72),
            &x,
            &Adapter {
                a,
                b: &fx.slots[1].as_ref().unwrap().1,
                rank: *rank,
                scale: *scale,
            },
        )
        .unwrap();
        assert!(t.iter().any(|v| (v * scale).abs() > 2f32.powi(32)));
        let y0 = vec![f16::NAN; m * 45];
        for dev in devices() {
            let got = run(&fx.pool(&dev), Some(regime), &x, &fx.w, &ids, 0.0, &y0).unwrap();
            let what = format!("F16 {regime:?} huge scale on {}", dev.name());
            fx.compare(&what, &got, &x, &ids, 0.0, &y0).unwrap();
            let err = off_fx
                .compare(&what, &got, &x, &ids, 0.0, &y0)
                .expect_err("a reference with scales off must fail the check");
            eprintln!("negative control {what}, scales x 1.003: {err}");
        }
    }
}

/// Each token's output depends only on its own adapter and the base: the
/// other tokens' rows are bit-identical whether or not the huge-scale slot's
/// tokens share their tile (their ids replaced by -1). (The tile expands one
/// slot at a time, other rows being zeros in that pass, and scales rows by
/// powers of two: this guards that structure, whatever sigma the huge rows get.)
#[test]
fn a_huge_scale_slot_leaves_the_other_tokens_bits_unchanged() {
    let fx = huge_scale_fixture();
    for (regime, m) in [(Regime::Decode, 21), (Regime::Prefill, 150)] {
        let x: Vec<f16> = random(&mut rng(63), m * 72);
        let with = huge_scale_ids(m);
        let without: Vec<i32> = with
            .iter()
            .map(|&id| if id == 1 { -1 } else { id })
            .collect();
        let y0 = vec![f16::NAN; m * 45];
        for dev in devices() {
            let pool = fx.pool(&dev);
            let got_with = run(&pool, Some(regime), &x, &fx.w, &with, 0.0, &y0).unwrap();
            let got_without = run(&pool, Some(regime), &x, &fx.w, &without, 0.0, &y0).unwrap();
            for (i, id) in with.iter().enumerate().filter(|(_, id)| **id != 1) {
                let bits = |y: &[f16]| {
                    y[i * 45..(i + 1) * 45]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    bits(&got_with),
                    bits(&got_without),
                    "{regime:?} token {i} (slot {id})"
                );
            }
        }
    }
}

/// A tile's distinct adapters are packed side by side into expand steps of
/// 64 ranks (lk::PackedSteps): with 8 adapters of ranks 1 to 80 in every
/// tile, steps hold several adapters at several offsets, and an adapter of
/// rank 80 takes two (64 + 16). `y` is within the reference bound, and each
/// token's `y` is the same bits as when every token of the batch uses that
/// token's adapter (one adapter per tile, at offset 0): a token's bits never
/// depend on its neighbours' adapters. Decode (21 and 64 tokens: one 64-row
/// tile, each warp packing its own rows) and prefill, both load paths, bf16
/// and f16.
#[test]
fn packed_expand_steps_keep_each_tokens_bits() {
    fn case<T: KernelElement>(regime: Regime, m: usize, k: usize) {
        let ranks = [1, 16, 24, 48, 64, 80, 3, 33];
        let fx = Fixture::<T>::new(45, k, 80, &ranks, 71);
        let x: Vec<T> = random(&mut rng(72), m * k);
        let ids: Vec<i32> = (0..m)
            .map(|i| ((i * 5 + i / 8) % ranks.len()) as i32)
            .collect();
        let y0 = vec![T::from_f64(f64::NAN); m * 45];
        for dev in devices() {
            fx.check(&dev, Some(regime), &x, &ids, 0.0).unwrap();
            let pool = fx.pool(&dev);
            let mixed = run(&pool, Some(regime), &x, &fx.w, &ids, 0.0, &y0).unwrap();
            for slot in 0..ranks.len() as i32 {
                let alone = run(&pool, Some(regime), &x, &fx.w, &vec![slot; m], 0.0, &y0).unwrap();
                for i in (0..m).filter(|&i| ids[i] == slot) {
                    let row = |y: &[T]| -> Vec<u64> {
                        y[i * 45..(i + 1) * 45]
                            .iter()
                            .map(|v| v.to_f64().to_bits())
                            .collect()
                    };
                    assert_eq!(
                        row(&mixed),
                        row(&alone),
                        "{:?} {regime:?} k={k} token {i} (slot {slot})",
                        T::DTYPE
                    );
                }
            }
        }
    }
    for k in [72, 70] {
        case::<bf16>(Regime::Decode, 21, k);
        case::<f16>(Regime::Decode, 21, k);
        case::<bf16>(Regime::Decode, 64, k);
        case::<bf16>(Regime::Prefill, 150, k);
        case::<f16>(Regime::Prefill, 150, k);
    }
}

/// Prefill tiles are 128 x 128 (4 warps of 64 x 64): 150 tokens (a full row
/// tile and 22 rows of a second) over n = 600 (four full column tiles and 88
/// columns of a fifth), mixed adapters (ranks 1 to 80: two rank chunks, an
/// empty slot, -1s), k on and off the 16-byte path, with and without beta:
/// every tile's `y` is within the reference bound, and a reference whose
/// scales are off by the negative control's factor fails it.
#[test]
fn prefill_tiles_cover_several_row_and_column_tiles() {
    fn case<T: KernelElement>(k: usize, beta: f32, off: f32) {
        let (m, n) = (150, 600);
        let ranks = [1, 16, 80, 0, 33];
        let fx = Fixture::<T>::new(n, k, 80, &ranks, 81 + k as u64);
        let x: Vec<T> = random(&mut rng(82), m * k);
        let ids: Vec<i32> = (0..m)
            .map(|i| [0, 1, 2, -1, 4][(i * 7 + i / 16) % 5])
            .collect();
        let y0: Vec<T> = random(&mut rng(83), m * n);
        let off_fx = fx.with_scales_times(1.0 + off);
        for dev in devices() {
            let got = run(
                &fx.pool(&dev),
                Some(Regime::Prefill),
                &x,
                &fx.w,
                &ids,
                beta,
                &y0,
            )
            .unwrap();
            let what = format!("{:?} prefill k={k} beta={beta} on {}", T::DTYPE, dev.name());
            fx.compare(&what, &got, &x, &ids, beta, &y0).unwrap();
            assert!(
                off_fx.compare(&what, &got, &x, &ids, beta, &y0).is_err(),
                "{what}: a reference with scales off by {off} must fail"
            );
        }
    }
    for (k, beta) in [(72, 0.0), (70, 0.5)] {
        case::<bf16>(k, beta, 1e-2);
        case::<f16>(k, beta, 3e-3);
    }
}

/// On the GPU: a multi-adapter launch captured in a CUDA graph stays valid when
/// the ids (on the device) and the pool's adapters change between replays,
/// because the launch shape never depends on them.
#[test]
fn gpu_graph_replay_follows_new_ids_and_adapters() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(base_dev) = gpu() else { return };
    // A private stream and context without cudarc's cross-stream event
    // tracking: capture takes only this stream's work.
    let stream = base_dev
        .cuda_stream()
        .unwrap()
        .context()
        .new_stream()
        .unwrap();
    // SAFETY: every buffer of this test is used on this one stream only.
    unsafe { stream.context().disable_event_tracking() };
    let dev = Device::from_stream(stream.clone()).unwrap();
    let mut fx = Fixture::<bf16>::new(64, 48, 8, &[8, 3, 5], 41);
    let m = 24;
    let x: Vec<bf16> = random(&mut rng(42), m * 48);
    let mut pool = fx.pool(&dev);
    pool.reserve_tokens(m).unwrap();
    let (xd, wd) = (dev.upload(&x).unwrap(), dev.upload(&fx.w).unwrap());
    let mut ids_dev = dev.upload(&vec![0i32; m]).unwrap();
    let mut y = dev.upload(&vec![bf16::NAN; m * 64]).unwrap();
    let run = |ids_dev: &lora_kernels::Buffer<i32>,
               y: &mut lora_kernels::Buffer<bf16>,
               pool: &AdapterPool<bf16>| {
        multi_adapter_forward(pool, m, &xd, &wd, &Routing::Tokens(ids_dev.into()), 0.0, y).unwrap()
    };
    run(&ids_dev, &mut y, &pool); // loads the module before capture
    dev.synchronize().unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    run(&ids_dev, &mut y, &pool);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a captured graph");
    let y0 = vec![bf16::NAN; m * 64];
    for round in 0..3u64 {
        let ids: Vec<i32> = (0..m as i32)
            .map(|i| ((i + round as i32) % 4) - 1)
            .collect();
        if round == 2 {
            let (a, b) = (random(&mut rng(43), 2 * 48), random(&mut rng(44), 64 * 2));
            pool.load(2, &a, &b, 2, 2.0).unwrap();
            fx.slots[2] = Some((a, b, 2, 2.0));
        }
        if let lora_kernels::Buffer::Cuda(s) = &mut ids_dev {
            stream.memcpy_htod(&ids, s).unwrap();
        }
        graph.launch().unwrap();
        let got = dev.download(&y).unwrap();
        fx.compare(&format!("graph replay {round}"), &got, &x, &ids, 0.0, &y0)
            .unwrap();
    }
}

/// Runs the op with a segment table (uploaded as given, unchecked) on the
/// pool's device.
fn run_segments<T: KernelElement>(
    pool: &AdapterPool<T>,
    regime: Regime,
    (x, w): (&[T], &[T]),
    (offsets, slots): (&[i32], &[i32]),
    y0: &[T],
) -> lora_kernels::Result<Vec<T>> {
    let dev = pool.device();
    let (xd, wd) = (dev.upload(x)?, dev.upload(w)?);
    let (od, sd) = (dev.upload(offsets)?, dev.upload(slots)?);
    let routing = Routing::Segments {
        offsets: (&od).into(),
        slots: (&sd).into(),
    };
    let mut y = dev.upload(y0)?;
    let m = x.len() / pool.config().k;
    multi_adapter_forward_in(regime, pool, m, &xd, &wd, &routing, 0.0, &mut y)?;
    dev.download(&y)
}

/// Malformed segment tables of `m` tokens for `segments_checked_on_the_device`:
/// decreasing, out of range, not starting at 0, not ending at m, and a long
/// table (more entries than one shrink block's threads) broken near its end.
fn malformed_tables(m: i32) -> Vec<(&'static str, Vec<i32>, Vec<i32>)> {
    let mut long: Vec<i32> = (0..=300).map(|j| (j * m / 300).min(m)).collect();
    long[281] = long[280] - 1;
    let long_slots = (0..300).map(|j| j % 3 - 1).collect();
    vec![
        ("decreasing", vec![0, 40, 10, m], vec![1, 0, 3]),
        ("negative offset", vec![0, -3, 45, m], vec![1, 0, 3]),
        ("offset past m", vec![0, 10, i32::MAX, m], vec![1, 0, 3]),
        ("not starting at 0", vec![5, 10, 45, m], vec![1, 0, 3]),
        ("ending before m", vec![0, 10, 45, m - 1], vec![1, 0, 3]),
        ("ending past m", vec![0, 10, 45, m + 1], vec![1, 0, 3]),
        ("long table, decreasing near its end", long, long_slots),
    ]
}

/// A malformed table on the device: every token gets the base model only
/// (bit-identical to all ids -1), the launch counts m bad ids, and the next
/// launch with a valid table is served normally (the flag was reset).
fn segments_checked_case<T: KernelElement>(regimes: &[Regime]) {
    let fx = Fixture::<T>::new(33, 40, 9, &[4, 9, 0, 1], 21);
    let m = 70;
    let x: Vec<T> = random(&mut rng(22), m * 40);
    let y0 = vec![T::from_f64(f64::NAN); m * 33];
    let (good_offsets, good_slots) = (vec![0, 10, 10, 45, 70], vec![1, 0, -1, 3]);
    let good_ids = reference::segment_ids(m, &good_offsets, &good_slots).unwrap();
    for dev in devices() {
        let pool = fx.pool(&dev);
        for &regime in regimes {
            let base = run(&pool, Some(regime), &x, &fx.w, &vec![-1; m], 0.0, &y0).unwrap();
            for (what, offsets, slots) in malformed_tables(m as i32) {
                let what = format!("{:?} {regime:?} {what} on {}", T::DTYPE, dev.name());
                let before = pool.bad_id_count().unwrap();
                let got =
                    run_segments(&pool, regime, (&x, &fx.w), (&offsets, &slots), &y0).unwrap();
                let same = got
                    .iter()
                    .zip(&base)
                    .all(|(g, b)| g.to_f64().to_bits() == b.to_f64().to_bits());
                assert!(same, "{what}: not served as base only");
                assert_eq!(pool.bad_id_count().unwrap(), before + m as u32, "{what}");
                let got = run_segments(
                    &pool,
                    regime,
                    (&x, &fx.w),
                    (&good_offsets, &good_slots),
                    &y0,
                )
                .unwrap();
                let after = format!("{what}, then a valid table");
                fx.compare(&after, &got, &x, &good_ids, 0.0, &y0).unwrap();
                assert_eq!(pool.bad_id_count().unwrap(), before + m as u32, "{after}");
            }
        }
    }
}

#[test]
fn segments_checked_on_the_device() {
    segments_checked_case::<f16>(&[Regime::Decode, Regime::Prefill]);
    segments_checked_case::<bf16>(&[Regime::Decode]);
    segments_checked_case::<f32>(&[Regime::Simt]);
}

// ---- The prefill's tile blocks on Hopper's wgmma and TMA (`LaunchForm::wgmma`) ----

fn wgmma_form(shrink_blocks: bool) -> lora_kernels::ops::multi_adapter_forward::LaunchForm {
    lora_kernels::ops::multi_adapter_forward::LaunchForm {
        shrink_blocks,
        wgmma: Some(true),
        ..Default::default()
    }
}

/// The wgmma prefill matches the reference within each element's bound:
/// several row tiles of 128 (the last partial) and column tiles of 128 (the
/// last partial), k off the 64-wide k-tile and past the 4 stages (the ring
/// wraps), mixed adapters in every tile (ranks 1 to 80: two rank chunks, an
/// empty slot, -1s, an out-of-range id counted once per launch), with and
/// without beta, with and without shrink blocks (the tile blocks' consumers
/// then take every shrink item), on the host runtime under each schedule and
/// on a Hopper GPU. A second launch gives the same bits (the counters are
/// back at 0), and a reference whose scales are off by the negative
/// control's factor fails.
#[test]
fn wgmma_prefill_matches_reference_with_mixed_adapters_in_every_tile() {
    fn case<T: KernelElement>((m, n, k): (usize, usize, usize), beta: f32, off: f32) {
        let ranks = [1, 16, 80, 0, 33];
        let fx = Fixture::<T>::new(n, k, 80, &ranks, 91 + k as u64);
        let x: Vec<T> = random(&mut rng(92), m * k);
        let ids: Vec<i32> = (0..m)
            .map(|i| [0, 1, 2, -1, 4, 9][(i * 7 + i / 16) % 6])
            .collect();
        let bad = ids.iter().filter(|&&id| id == 9).count() as u32;
        let y0: Vec<T> = if beta == 0.0 {
            vec![T::from_f64(f64::NAN); m * n]
        } else {
            random(&mut rng(93), m * n)
        };
        let off_fx = fx.with_scales_times(1.0 + off);
        for dev in wgmma_devices() {
            let pool = fx.pool(&dev);
            for shrink_blocks in [true, false] {
                let what = format!(
                    "{:?} wgmma {m}x{n}x{k} beta={beta} shrink blocks {shrink_blocks} on {}",
                    T::DTYPE,
                    dev.name()
                );
                let form = wgmma_form(shrink_blocks);
                let (done, got) =
                    run_form(&pool, Regime::Prefill, form, &x, &fx.w, &ids, beta, &y0);
                done.unwrap_or_else(|e| panic!("{what}: {e}"));
                fx.compare(&what, &got, &x, &ids, beta, &y0).unwrap();
                assert!(
                    off_fx.compare(&what, &got, &x, &ids, beta, &y0).is_err(),
                    "{what}: a reference with scales off by {off} must fail"
                );
                let (again_done, again) =
                    run_form(&pool, Regime::Prefill, form, &x, &fx.w, &ids, beta, &y0);
                again_done.unwrap();
                assert!(same_bits(&got, &again), "{what}: a second launch differs");
                assert_eq!(pool.bad_id_count().unwrap(), 2 * bad, "{what}");
                pool.reset_bad_id_count().unwrap();
            }
        }
    }
    case::<bf16>((150, 300, 72), 0.0, 1e-2);
    case::<f16>((150, 300, 72), 0.5, 3e-3);
    case::<bf16>((70, 136, 328), -1.0, 1e-2);
    case::<f16>((129, 40, 264), 0.0, 3e-3);
}

/// Segments routed on the device, and a malformed table: every token is
/// then served as -1 (base only) and m tokens are counted, as in the
/// mma.sync kernel.
#[test]
fn wgmma_prefill_routes_segments_and_serves_a_malformed_table_as_base() {
    let fx = Fixture::<bf16>::new(40, 64, 9, &[4, 9, 0, 1], 17);
    let m = 140;
    let x: Vec<bf16> = random(&mut rng(18), m * 64);
    for dev in wgmma_devices() {
        let pool = fx.pool(&dev);
        let (xd, wd) = (dev.upload(&x).unwrap(), dev.upload(&fx.w).unwrap());
        for (offsets, slots, bad_table) in [
            (vec![0, 10, 10, 45, 140], vec![1, 0, -1, 3], false),
            (vec![0, 50, 20, 140], vec![1, 0, 3], true),
        ] {
            let ids = if bad_table {
                vec![-1; m]
            } else {
                reference::segment_ids(m, &offsets, &slots).unwrap()
            };
            let (od, sd) = (dev.upload(&offsets).unwrap(), dev.upload(&slots).unwrap());
            let routing = Routing::Segments {
                offsets: (&od).into(),
                slots: (&sd).into(),
            };
            let y0 = vec![bf16::from_f64(f64::NAN); m * 40];
            let mut y = dev.upload(&y0).unwrap();
            lora_kernels::ops::multi_adapter_forward::multi_adapter_forward_tuned(
                Regime::Prefill,
                wgmma_form(true),
                &pool,
                m,
                ((&xd).into(), (&wd).into()),
                &routing,
                0.0,
                ((&mut y).into(), None),
            )
            .unwrap();
            let got = dev.download(&y).unwrap();
            let what = format!("wgmma segments (malformed: {bad_table}) on {}", dev.name());
            fx.compare(&what, &got, &x, &ids, 0.0, &y0).unwrap();
            let counted = if bad_table { m as u32 } else { 0 };
            assert_eq!(pool.bad_id_count().unwrap(), counted, "{what}");
            pool.reset_bad_id_count().unwrap();
        }
    }
}

/// Inf in x (a token without an adapter: its y is +-Inf; and one with an
/// adapter: NaN where infinities of both signs meet), NaN in x, and a slot
/// whose f16 `s t` is far past f16's range: the wgmma prefill has the
/// reference's infinities and NaNs and is within the bound elsewhere.
#[test]
fn wgmma_prefill_with_nan_inf_and_a_huge_scale_matches_reference() {
    let fx = huge_scale_fixture();
    let k = fx.cfg.k;
    let m = 130;
    let mut x: Vec<f16> = random(&mut rng(19), m * k);
    let ids = huge_scale_ids(m);
    assert_eq!((ids[2], ids[3]), (-1, 0));
    x[2 * k + 5] = f16::INFINITY;
    x[3 * k + 5] = f16::INFINITY;
    x[70 * k + 1] = f16::NAN;
    for dev in wgmma_devices() {
        let pool = fx.pool(&dev);
        let y0 = vec![f16::NAN; m * fx.cfg.n];
        let (done, got) = run_form(
            &pool,
            Regime::Prefill,
            wgmma_form(true),
            &x,
            &fx.w,
            &ids,
            0.0,
            &y0,
        );
        done.unwrap();
        let want = fx.expected(&x, &ids, 0.0, &y0);
        assert!(want.iter().any(|v| v.is_nan()) && want.iter().any(|v| v.is_infinite()));
        fx.compare(
            &format!("wgmma huge scale on {}", dev.name()),
            &got,
            &x,
            &ids,
            0.0,
            &y0,
        )
        .unwrap();
    }
}

/// What the wgmma prefill can't take is an error naming why, with `y`
/// unchanged: the decode regime, k not a multiple of 8, an f32 pool (it has
/// no tensor-core regime), a GPU other than compute capability 9.0.
#[test]
fn wgmma_prefill_refuses_what_it_cannot_take_and_changes_nothing() {
    fn refused<T: KernelElement>(dev: &Device, regime: Regime, k: usize, what: &str) {
        let fx = Fixture::<T>::new(40, k, 8, &[8, 3], 21);
        let m = 130;
        let x: Vec<T> = random(&mut rng(22), m * k);
        let ids: Vec<i32> = (0..m as i32).map(|i| i % 2).collect();
        let y0: Vec<T> = random(&mut rng(23), m * 40);
        let pool = fx.pool(dev);
        let (done, got) = run_form(&pool, regime, wgmma_form(true), &x, &fx.w, &ids, 0.5, &y0);
        let err = done.unwrap_err().to_string();
        assert!(err.contains(what), "{regime:?} k={k} {:?}: {err}", T::DTYPE);
        assert!(same_bits(&got, &y0), "y changed");
    }
    for dev in devices() {
        match dev.compute_capability() {
            Some(cc) if cc != (9, 0) => {
                refused::<bf16>(&dev, Regime::Prefill, 64, "compute capability")
            }
            _ => {
                refused::<bf16>(&dev, Regime::Decode, 64, "prefill regime");
                refused::<f16>(&dev, Regime::Prefill, 60, "`k`");
                refused::<f32>(&dev, Regime::Simt, 64, "prefill regime");
            }
        }
    }
}

/// Every token on no adapter (rank 0 through the wgmma mainloop, as the
/// tour's base-GEMM row times it): y is the base product x w^T (+ beta y)
/// within its bound; nothing is counted as a bad id.
#[test]
fn wgmma_prefill_without_adapters_is_the_base_product() {
    let fx = Fixture::<bf16>::new(264, 136, 16, &[0], 31);
    let m = 200;
    let x: Vec<bf16> = random(&mut rng(32), m * 136);
    let ids = vec![-1; m];
    let y0: Vec<bf16> = random(&mut rng(33), m * 264);
    for dev in wgmma_devices() {
        let pool = fx.pool(&dev);
        let (done, got) = run_form(
            &pool,
            Regime::Prefill,
            wgmma_form(true),
            &x,
            &fx.w,
            &ids,
            0.5,
            &y0,
        );
        done.unwrap();
        fx.compare(
            &format!("wgmma, no adapters, on {}", dev.name()),
            &got,
            &x,
            &ids,
            0.5,
            &y0,
        )
        .unwrap();
        assert_eq!(pool.bad_id_count().unwrap(), 0);
    }
}

// ---- Decode with w loaded straight into registers (`LaunchForm::direct_loads`) ----

fn direct_form(
    k_splits: Option<usize>,
    shrink_blocks: bool,
) -> lora_kernels::ops::multi_adapter_forward::LaunchForm {
    lora_kernels::ops::multi_adapter_forward::LaunchForm {
        direct_loads: true,
        k_splits,
        shrink_blocks,
        ..Default::default()
    }
}

/// The direct-load decode matches the reference within each element's
/// bound: 1 to 16 tokens (rows g + 8 of the fragment empty up to 8) and
/// several 16-row tiles (40 and 64 tokens), n off
/// the 32-column tile (a w row past n is read as the last one), k a multiple
/// of 8 but not of 32 (the lanes of a chunk's tail load zeros) and shorter
/// than one round of chunks (24, 72), every split count (up to 2 blocks per
/// SM), with and without
/// shrink blocks, ranks 1 to 64, an empty slot, -1s and an out-of-range id
/// counted once per launch, beta 0, 0.5 and -1; on the host runtime with its
/// warps in turn and interleaved, and on a GPU. A second launch gives the
/// same bits, and a reference with scales off by 1% (bf16) or 0.3% (f16)
/// fails.
#[test]
fn decode_direct_loads_match_reference_for_every_split_count() {
    fn case<T: KernelElement>(dev: &Device, (m, n, k): (usize, usize, usize), beta: f32, off: f32) {
        // Up to 16 splits: at 64 tokens 12 tiles x 16 = 192 blocks, past one
        // a SM (132 on the host runtime), within the two direct-load blocks
        // an SM takes.
        let ktiles = k.div_ceil(64);
        let mut splits = vec![None, Some(1), Some(2.min(ktiles)), Some(ktiles.min(16))];
        splits.dedup();
        let forms: Vec<_> = splits
            .into_iter()
            .flat_map(|k_splits| {
                [true, false].map(|shrink_blocks| direct_form(k_splits, shrink_blocks))
            })
            .collect();
        // Too few elements to see a 1% scale error: no control there.
        let control = (m * n >= 64).then_some(off);
        check_forms::<T>(dev, Regime::Decode, (m, n, k), beta, &forms, control);
    }
    for dev in devices_and_interleaved() {
        for (shape, beta) in [
            ((1, 70, 840), 0.0),
            ((16, 96, 1000), 0.5),
            ((5, 40, 2056), 0.0),
            ((9, 33, 72), -1.0),
            ((8, 45, 24), 0.5),
            ((3, 1, 8), 0.0),
            ((40, 33, 776), 0.5),
            ((64, 70, 1000), 0.0),
        ] {
            case::<bf16>(&dev, shape, beta, 1e-2);
            case::<f16>(&dev, shape, beta, 3e-3);
        }
    }
}

/// Inf in x (a token without an adapter: its y is +-Inf; one with an
/// adapter: NaN where infinities of both signs meet) and in the last token's
/// row (which the fragment's empty rows read in its place: nothing of them
/// may reach y), NaN in x and in w's last row (which columns past n read),
/// and a slot whose f16 `s t` is far past f16's range: the direct-load
/// decode has the reference's infinities and NaNs and is within the bound
/// elsewhere.
#[test]
fn decode_direct_loads_with_nan_inf_and_a_huge_scale_match_reference() {
    let mut fx = huge_scale_fixture();
    let (n, k) = (fx.cfg.n, fx.cfg.k);
    fx.w[(n - 1) * k + 3] = f16::NAN;
    for m in [5, 12] {
        let mut x: Vec<f16> = random(&mut rng(19), m * k);
        let ids = huge_scale_ids(m);
        assert_eq!((ids[2], ids[3]), (-1, 0));
        x[2 * k + 5] = f16::INFINITY;
        x[3 * k + 5] = f16::INFINITY;
        x[4 * k + 1] = f16::NAN;
        x[(m - 1) * k + 9] = f16::NEG_INFINITY;
        for dev in devices() {
            let pool = fx.pool(&dev);
            let y0 = vec![f16::NAN; m * n];
            for k_splits in [Some(1), Some(2)] {
                let form = direct_form(k_splits, true);
                let (done, got) = run_form(&pool, Regime::Decode, form, &x, &fx.w, &ids, 0.0, &y0);
                done.unwrap();
                let want = fx.expected(&x, &ids, 0.0, &y0);
                assert!(want.iter().any(|v| v.is_nan()) && want.iter().any(|v| v.is_infinite()));
                let what = format!("direct m={m} {k_splits:?} huge scale on {}", dev.name());
                fx.compare(&what, &got, &x, &ids, 0.0, &y0).unwrap();
            }
        }
    }
}

/// What the direct-load decode can't take is an error naming
/// `direct_loads`, with `y` unchanged: 64-row tiles, the prefill regime, an
/// f32 pool, k not a multiple of 8; and a split count past 2 blocks per SM
/// is one naming `k_splits`.
#[test]
fn decode_direct_loads_refuse_what_they_cannot_take_and_change_nothing() {
    use lora_kernels::ops::multi_adapter_forward::LaunchForm;
    fn refused<T: KernelElement>(regime: Regime, m: usize, k: usize, wide_tiles: Option<bool>) {
        let fx = Fixture::<T>::new(40, k, 8, &[8, 3], 21);
        let x: Vec<T> = random(&mut rng(22), m * k);
        let ids: Vec<i32> = (0..m as i32).map(|i| i % 2).collect();
        let y0: Vec<T> = random(&mut rng(23), m * 40);
        let form = LaunchForm {
            wide_tiles,
            ..direct_form(None, true)
        };
        for dev in devices() {
            let pool = fx.pool(&dev);
            let (done, got) = run_form(&pool, regime, form, &x, &fx.w, &ids, 0.5, &y0);
            assert_refused(done, &got, &y0, "direct_loads");
        }
    }
    refused::<bf16>(Regime::Decode, 17, 64, Some(true));
    refused::<f16>(Regime::Decode, 4, 64, Some(true));
    refused::<bf16>(Regime::Prefill, 130, 64, None);
    refused::<f32>(Regime::Simt, 4, 64, None);
    refused::<f16>(Regime::Decode, 4, 60, None);
    refused::<bf16>(Regime::Decode, 1, 4, None);

    // 12 tiles x 23 splits: 276 blocks, past 2 x 132.
    let fx = Fixture::<bf16>::new(70, 2000, 16, &[16], 5);
    let (x, y0): (Vec<bf16>, Vec<bf16>) =
        (random(&mut rng(6), 64 * 2000), random(&mut rng(7), 64 * 70));
    let pool = fx.pool(&Device::host().unwrap());
    let (done, y) = run_form(
        &pool,
        Regime::Decode,
        direct_form(Some(23), true),
        &x,
        &fx.w,
        &[0; 64],
        0.5,
        &y0,
    );
    assert_refused(done, &y, &y0, "k_splits");
}

// ---- The default's choice between the mma.sync and wgmma prefills ----

/// `multi_adapter_forward` takes the wgmma tile blocks where their 128 x 128
/// tiles fill every SM 4 times (528 tiles on the host runtime's 132 SMs) on
/// a device that runs them (the host runtime, compute capability 9.0), and
/// the mma.sync tiles below: one row past 4 x SMs - 1 row tiles tips it.
/// `y` is within its bound either way (mixed adapters, ranks 1 to 16,
/// tokens on none). Past the limit, k not a multiple of 8 (no TMA rows)
/// runs on the mma.sync tiles instead of failing, as does a form that
/// forces a split count; `wgmma: Some(false)` keeps it off.
#[test]
fn default_prefill_takes_wgmma_from_four_waves_of_tiles() {
    use lora_kernels::ops::multi_adapter_forward::LaunchForm;
    let (aligned, any) = (
        "lk_multi_adapter_prefill_bf16_aligned",
        "lk_multi_adapter_prefill_bf16_any",
    );
    for dev in devices() {
        let wgmma = if runs_wgmma(&dev) {
            "lk_multi_adapter_wgmma_bf16"
        } else {
            aligned
        };
        let limit = wgmma_prefill_rows(&dev);
        // (tokens, k, the form's wgmma and k_splits, the kernel that runs)
        for (m, k, forced, kernel) in [
            (limit - 1, 64, (None, None), aligned),
            (limit, 64, (None, None), wgmma),
            (limit, 60, (None, None), any),
            (limit, 64, (Some(false), None), aligned),
            (limit, 64, (None, Some(1)), aligned),
        ] {
            let fx = Fixture::<bf16>::new(8, k, 16, &[1, 16, 5], 40 + k as u64);
            let pool = fx.pool(&dev);
            let x: Vec<bf16> = random(&mut rng(41), m * k);
            let ids: Vec<i32> = (0..m).map(|i| [0, 1, 2, -1][(i / 7) % 4]).collect();
            let y0 = vec![bf16::NAN; m * 8];
            let what = format!(
                "m={m} k={k} (wgmma, k_splits) = {forced:?} on {}",
                dev.name()
            );
            lora_kernels::take_recent_launches();
            let y = if forced == (None, None) {
                run(&pool, None, &x, &fx.w, &ids, 0.0, &y0).unwrap()
            } else {
                let form = LaunchForm {
                    wgmma: forced.0,
                    k_splits: forced.1,
                    ..LaunchForm::default()
                };
                let (done, y) = run_form(&pool, Regime::Prefill, form, &x, &fx.w, &ids, 0.0, &y0);
                done.map(|()| y).unwrap()
            };
            let launched = lora_kernels::take_recent_launches();
            assert_eq!(launched, [kernel], "{what}");
            fx.compare(&what, &y, &x, &ids, 0.0, &y0).unwrap();
        }
    }
}

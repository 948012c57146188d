//! One user's adapter never touches another user's output (docs/DESIGN.md
//! section 10): every token's output and gradients depend only on its own
//! input, its own adapter and the base. A victim slot is poisoned with NaN,
//! +Inf and -Inf through every way into a pool (`AdapterPool::load`, the
//! optimizer's `load_adapter` and `step`), a victim token's input and
//! gradient are poisoned, and the victim adapter is made huge but finite; the
//! other tokens' outputs and gradients, and the other slots' weights, must be
//! bit-identical to a clean run, in every regime, with ids and with segments.
mod common;

use common::*;
use half::{bf16, f16};
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer, SlotStatus};
use lora_kernels::ops::fused_forward::Regime;
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, multi_adapter_backward,
};
use lora_kernels::ops::multi_adapter_forward::{
    Routing, multi_adapter_forward_in, multi_adapter_forward_saving_t,
};
use lora_kernels::{AdapterPool, Device, Element, KernelElement, PoolConfig};

/// The slot whose adapter gets poisoned.
const VICTIM: usize = 1;
/// Ranks of the pool's slots: mixed, rank 1 included.
const RANKS: [usize; 4] = [3, 5, 1, 17];
const POISONS: [f64; 3] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];

/// A batch of several users' tokens and the pool they are served from.
#[derive(Clone)]
struct World<T> {
    dev: Device,
    cfg: PoolConfig,
    /// Per slot: a `[rank, k]`, b `[n, rank]` (f32 values exactly representable in T).
    adapters: Vec<(Vec<f32>, Vec<f32>, usize, f32)>,
    w: Vec<T>,
    x: Vec<T>,
    g: Vec<T>,
    /// Slot of each token, sorted (so the same batch can be routed by segments).
    ids: Vec<i32>,
}

/// Everything a batch produces: y, and the gradients dx, da, db.
#[derive(Clone)]
struct Outputs<T> {
    y: Vec<T>,
    dx: Vec<T>,
    da: Vec<f32>,
    db: Vec<f32>,
}

impl<T: KernelElement> World<T> {
    fn new(dev: &Device, m: usize, seed: u64) -> Self {
        let (n, k) = (37, 29);
        let mut g = rng(seed);
        let cfg = PoolConfig {
            slots: RANKS.len(),
            max_rank: 17,
            n,
            k,
        };
        let exact = |v: Vec<T>| v.iter().map(|e| e.to_f64() as f32).collect::<Vec<f32>>();
        let adapters = RANKS
            .iter()
            .enumerate()
            .map(|(s, &r)| {
                let a = exact(random::<T>(&mut g, r * k));
                let b = exact(random::<T>(&mut g, n * r));
                (a, b, r, 0.5 + s as f32 * 0.25)
            })
            .collect();
        // Every slot and the base (-1) in runs of different lengths, sorted.
        let ids = (0..m)
            .map(|i| (i * (RANKS.len() + 1) / m) as i32 - 1)
            .collect();
        World {
            dev: dev.clone(),
            cfg,
            adapters,
            w: random(&mut g, n * k),
            x: random(&mut g, m * k),
            g: random(&mut g, m * n),
            ids,
        }
    }

    fn m(&self) -> usize {
        self.ids.len()
    }

    /// A pool and its optimizer, every slot loaded through the optimizer.
    fn pool(&self) -> (AdapterPool<T>, SlotOptimizer) {
        let mut pool = AdapterPool::new(&self.dev, self.cfg).unwrap();
        let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default()).unwrap();
        for (s, (a, b, r, scale)) in self.adapters.iter().enumerate() {
            opt.load_adapter(&mut pool, s, a, b, *r, *scale, hyper(1e-2))
                .unwrap();
        }
        (pool, opt)
    }

    /// Serves the batch (routed by ids or by segments) and trains on it.
    fn run(&self, pool: &AdapterPool<T>, regime: Regime, segments: bool) -> Outputs<T> {
        let dev = &self.dev;
        let (
            m,
            PoolConfig {
                slots,
                max_rank,
                n,
                k,
            },
        ) = (self.m(), self.cfg);
        let (x, w) = (dev.upload(&self.x).unwrap(), dev.upload(&self.w).unwrap());
        let ids = dev.upload(&self.ids).unwrap();
        let (offsets, seg_slots) = segment_table(&self.ids);
        let (offsets, seg_slots) = (
            dev.upload(&offsets).unwrap(),
            dev.upload(&seg_slots).unwrap(),
        );
        let routing = if segments {
            Routing::Segments {
                offsets: (&offsets).into(),
                slots: (&seg_slots).into(),
            }
        } else {
            Routing::Tokens((&ids).into())
        };
        let mut y = dev.upload(&vec![T::from_f64(f64::NAN); m * n]).unwrap();
        multi_adapter_forward_in(regime, pool, m, &x, &w, &routing, 0.0, &mut y).unwrap();

        let mut y_train = dev.zeros::<T>(m * n).unwrap();
        let mut t = dev.zeros::<f32>(m * max_rank).unwrap();
        multi_adapter_forward_saving_t(pool, m, &x, &w, &routing, &mut y_train, &mut t).unwrap();
        let g = dev.upload(&self.g).unwrap();
        let mut dx = dev.upload(&vec![T::from_f64(f64::NAN); m * k]).unwrap();
        let mut da = dev.zeros::<f32>(slots * max_rank * k).unwrap();
        let mut db = dev.zeros::<f32>(slots * n * max_rank).unwrap();
        let grads = Grads {
            dx: Some((&mut dx).into()),
            da: Some((&mut da).into()),
            db: Some((&mut db).into()),
        };
        let inputs = DeviceBackwardInputs::new(&g, &x, &w, &t);
        let mut scratch = BackwardScratch::new(dev).unwrap();
        let opts = BackwardOptions::default();
        multi_adapter_backward(pool, m, &ids, inputs, grads, opts, &mut scratch).unwrap();
        Outputs {
            y: dev.download(&y).unwrap(),
            dx: dev.download(&dx).unwrap(),
            da: dev.download(&da).unwrap(),
            db: dev.download(&db).unwrap(),
        }
    }

    /// The tokens that do not use the victim slot.
    fn bystanders(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.m()).filter(|&i| self.ids[i] != VICTIM as i32)
    }

    /// Every bystander token's y and dx rows, and every other slot's da and
    /// db, bit-identical in `got` and `clean`.
    fn bystanders_unchanged(&self, what: &str, clean: &Outputs<T>, got: &Outputs<T>) {
        let PoolConfig {
            slots,
            max_rank,
            n,
            k,
        } = self.cfg;
        for i in self.bystanders() {
            let rows = |v: &[T], len: usize| bits(&v[i * len..(i + 1) * len]);
            assert_eq!(rows(&got.y, n), rows(&clean.y, n), "{what}: y of token {i}");
            assert_eq!(
                rows(&got.dx, k),
                rows(&clean.dx, k),
                "{what}: dx of token {i}"
            );
        }
        for s in (0..slots).filter(|&s| s != VICTIM) {
            let (ra, rb) = (max_rank * k, n * max_rank);
            let part = |v: &[f32], len: usize| bits(&v[s * len..(s + 1) * len]);
            assert_eq!(
                part(&got.da, ra),
                part(&clean.da, ra),
                "{what}: da of slot {s}"
            );
            assert_eq!(
                part(&got.db, rb),
                part(&clean.db, rb),
                "{what}: db of slot {s}"
            );
        }
    }
}

fn hyper(lr: f32) -> SlotHyper {
    SlotHyper {
        lr,
        weight_decay: 0.01,
        max_grad_norm: 0.0,
        anchor_pull: 0.0,
    }
}

/// The segment table of sorted ids: offsets (segments + 1) and slots.
fn segment_table(ids: &[i32]) -> (Vec<i32>, Vec<i32>) {
    let (mut offsets, mut slots) = (vec![0], vec![]);
    for (i, &id) in ids.iter().enumerate() {
        if i > 0 && ids[i - 1] == id {
            *offsets.last_mut().unwrap() = i as i32 + 1;
        } else {
            slots.push(id);
            offsets.push(i as i32 + 1);
        }
    }
    (offsets, slots)
}

/// Bit patterns (through f64, exact for every storage type), for equality
/// that tells -0 from 0 and compares NaN with NaN.
fn bits<E: Element>(v: &[E]) -> Vec<u64> {
    v.iter().map(|e| e.to_f64().to_bits()).collect()
}

/// The regimes a type runs in, with a batch size for each.
fn regimes<T: KernelElement>() -> Vec<(Regime, usize)> {
    match T::DTYPE {
        lora_kernels::DType::F32 => vec![(Regime::Simt, 45)],
        _ => vec![(Regime::Decode, 23), (Regime::Prefill, 150)],
    }
}

/// Each poison through `AdapterPool::load` and the optimizer's
/// `load_adapter` is refused, and the refused call changes nothing: every
/// output of every token stays bit-identical.
fn refused_at_the_door<T: KernelElement>() {
    for dev in devices() {
        for (regime, m) in regimes::<T>() {
            let world = World::<T>::new(&dev, m, 1);
            let (mut pool, mut opt) = world.pool();
            let clean = world.run(&pool, regime, false);
            let (a, b, r, scale) = world.adapters[VICTIM].clone();
            for poison in POISONS {
                for (operand, at) in [("a", r * world.cfg.k / 2), ("b", 0)] {
                    let (mut pa, mut pb) = (a.clone(), b.clone());
                    let target = if operand == "a" { &mut pa } else { &mut pb };
                    target[at] = poison as f32;
                    let what = format!("{:?} {regime:?} {poison} in {operand}", T::DTYPE);
                    let round = |v: &[f32]| v.iter().map(|&e| T::from_f64(e as f64)).collect();
                    let (ta, tb): (Vec<T>, Vec<T>) = (round(&pa), round(&pb));
                    let err = pool.load(VICTIM, &ta, &tb, r, scale);
                    assert!(err.is_err(), "{what}: pool.load accepted it");
                    let err = opt.load_adapter(&mut pool, VICTIM, &pa, &pb, r, scale, hyper(1e-2));
                    assert!(err.is_err(), "{what}: load_adapter accepted it");
                    for segments in [false, true] {
                        let got = world.run(&pool, regime, segments);
                        assert_eq!(bits(&got.y), bits(&clean.y), "{what}: y changed");
                        assert_eq!(bits(&got.dx), bits(&clean.dx), "{what}: dx changed");
                        assert_eq!(bits(&got.da), bits(&clean.da), "{what}: da changed");
                        assert_eq!(bits(&got.db), bits(&clean.db), "{what}: db changed");
                    }
                }
            }
        }
    }
}

#[test]
fn poisoned_weights_are_refused_at_every_way_in() {
    refused_at_the_door::<f32>();
    refused_at_the_door::<f16>();
    refused_at_the_door::<bf16>();
}

/// The optimizer's step with a poisoned gradient for the victim, or a
/// learning rate that would overflow its weights: the victim's step is
/// skipped, and every other slot steps exactly as in a clean step.
fn poisoned_steps_stay_with_the_victim<T: KernelElement>() {
    for dev in devices() {
        for (regime, m) in regimes::<T>() {
            let world = World::<T>::new(&dev, m, 2);
            let PoolConfig {
                slots,
                max_rank,
                n,
                k,
            } = world.cfg;
            let grads = |poison: Option<f64>| {
                let mut g = rng(3);
                let mut ga: Vec<f32> = random(&mut g, slots * max_rank * k);
                let gb: Vec<f32> = random(&mut g, slots * n * max_rank);
                if let Some(p) = poison {
                    ga[VICTIM * max_rank * k] = p as f32;
                }
                (dev.upload(&ga).unwrap(), dev.upload(&gb).unwrap())
            };
            let stepped = |poison: Option<f64>, victim_lr: f32| {
                let (mut pool, mut opt) = world.pool();
                opt.set_hyper(VICTIM, hyper(victim_lr)).unwrap();
                let (ga, gb) = grads(poison);
                opt.step(&mut pool, &ga, &gb).unwrap();
                let status = opt.statuses().unwrap();
                (pool, status)
            };
            let (clean_pool, clean_status) = stepped(None, 1e-2);
            assert!(matches!(clean_status[VICTIM], SlotStatus::Updated { .. }));
            let clean = world.run(&clean_pool, regime, false);
            let overflow = (None, f32::MAX);
            let poisoned = POISONS.map(|p| (Some(p), 1e-2));
            for (poison, lr) in poisoned.into_iter().chain([overflow]) {
                let what = format!("{:?} {regime:?} step, poison {poison:?}, lr {lr}", T::DTYPE);
                let (pool, status) = stepped(poison, lr);
                assert!(
                    !matches!(status[VICTIM], SlotStatus::Updated { .. }),
                    "{what}: the victim stepped: {:?}",
                    status[VICTIM]
                );
                for s in (0..slots).filter(|&s| s != VICTIM) {
                    assert_eq!(status[s], clean_status[s], "{what}: status of slot {s}");
                    let (got, want) = (pool.adapter(s).unwrap(), clean_pool.adapter(s).unwrap());
                    assert_eq!(got, want, "{what}: weights of slot {s}");
                }
                for segments in [false, true] {
                    world.bystanders_unchanged(&what, &clean, &world.run(&pool, regime, segments));
                }
            }
        }
    }
}

#[test]
fn a_poisoned_step_changes_no_other_slot() {
    poisoned_steps_stay_with_the_victim::<f32>();
    poisoned_steps_stay_with_the_victim::<f16>();
    poisoned_steps_stay_with_the_victim::<bf16>();
}

/// A victim token's own input and output gradient hold NaN or Inf, or the
/// victim adapter is huge but finite (f16: |s t| far past 65504): the other
/// tokens are untouched.
fn a_victims_own_data_stays_its_own<T: KernelElement>() {
    for dev in devices() {
        for (regime, m) in regimes::<T>() {
            let mut world = World::<T>::new(&dev, m, 4);
            let (pool, _opt) = world.pool();
            let clean = world.run(&pool, regime, false);
            let victim_token = world
                .ids
                .iter()
                .position(|&id| id == VICTIM as i32)
                .unwrap();
            let (n, k) = (world.cfg.n, world.cfg.k);
            for poison in POISONS {
                let what = format!("{:?} {regime:?} {poison} in x and g", T::DTYPE);
                let mut poisoned = world.clone();
                poisoned.x[victim_token * k + 3] = T::from_f64(poison);
                poisoned.g[victim_token * n + 5] = T::from_f64(poison);
                for segments in [false, true] {
                    let got = poisoned.run(&pool, regime, segments);
                    world.bystanders_unchanged(&what, &clean, &got);
                }
            }
            // Huge but finite: as large a scale as keeps y itself in range.
            world.adapters[VICTIM].3 = 2e4;
            let (huge_pool, _opt) = world.pool();
            let what = format!("{:?} {regime:?} huge victim adapter", T::DTYPE);
            for segments in [false, true] {
                let got = world.run(&huge_pool, regime, segments);
                world.bystanders_unchanged(&what, &clean, &got);
            }
        }
    }
}

#[test]
fn a_victims_own_inputs_and_huge_adapter_stay_its_own() {
    a_victims_own_data_stays_its_own::<f32>();
    a_victims_own_data_stays_its_own::<f16>();
    a_victims_own_data_stays_its_own::<bf16>();
}

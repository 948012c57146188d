//! The ways into a pool: no non-finite weight enters it (through
//! `AdapterPool::load`, `SlotOptimizer::load_adapter` or a step), a failed
//! call changes nothing, and an optimizer trains only its own pool and only
//! the adapters it loaded itself.
mod common;

use common::*;
use half::{bf16, f16};
use lora_kernels::ops::KernelElement;
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer, SlotStatus};
use lora_kernels::{AdapterPool, DType, Device, Error, PoolConfig};

const CFG: PoolConfig = PoolConfig {
    slots: 3,
    max_rank: 4,
    n: 7,
    k: 5,
};

const HYPER: SlotHyper = SlotHyper {
    lr: 1e-2,
    weight_decay: 0.01,
    max_grad_norm: 0.0,
    anchor_pull: 0.0,
};

/// Every slot of the pool, bit for bit: (a, b, rank, scale) or None.
type PoolBits = Vec<Option<(Vec<u64>, Vec<u64>, usize, u32)>>;

fn pool_bits<T: KernelElement>(pool: &AdapterPool<T>) -> PoolBits {
    let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect();
    (0..pool.config().slots)
        .map(|s| {
            let adapter = pool.adapter(s).unwrap()?;
            let (a, b) = (bits(&adapter.a), bits(&adapter.b));
            Some((a, b, adapter.rank, adapter.scale.to_bits()))
        })
        .collect()
}

/// The optimizer's masters of `slots`, its step counts and statuses, bit for bit.
fn optimizer_bits<T: KernelElement>(
    opt: &SlotOptimizer,
    pool: &AdapterPool<T>,
    slots: &[usize],
) -> (Vec<u32>, Vec<i32>, String) {
    let mut masters = Vec::new();
    for &s in slots {
        let (a, b) = opt.master(pool, s).unwrap();
        masters.extend(a.iter().chain(&b).map(|v| v.to_bits()));
    }
    let statuses = format!("{:?}", opt.statuses().unwrap());
    (masters, opt.steps().unwrap(), statuses)
}

fn weights<T: KernelElement>(seed: u64, rank: usize) -> (Vec<T>, Vec<T>) {
    (
        random(&mut rng(seed), rank * CFG.k),
        random(&mut rng(seed + 1000), CFG.n * rank),
    )
}

fn step(
    opt: &mut SlotOptimizer,
    pool: &mut AdapterPool<impl KernelElement>,
    seed: u64,
) -> Result<(), Error> {
    let PoolConfig {
        slots,
        max_rank,
        n,
        k,
    } = CFG;
    let dev = pool.device().clone();
    let ga = dev.upload(&random::<f32>(&mut rng(seed), slots * max_rank * k))?;
    let gb = dev.upload(&random::<f32>(&mut rng(seed + 1), slots * n * max_rank))?;
    opt.step(pool, &ga, &gb)
}

/// NaN, +Inf and -Inf at one index of `a` or `b`: (operand, index, value).
fn poisons(rank: usize) -> [(&'static str, usize, f32); 3] {
    [
        ("a", rank * CFG.k - 1, f32::NAN),
        ("b", 0, f32::INFINITY),
        ("a", 2, f32::NEG_INFINITY),
    ]
}

fn expect_non_finite(err: Error, operand: &str, index: usize, value: f32) {
    match err {
        Error::NonFinite {
            operand: o,
            index: i,
            value: v,
        } if o == operand && i == index && v.to_bits() == value.to_bits() => {}
        other => panic!("expected NonFinite {{ {operand}, {index}, {value} }}, got {other:?}"),
    }
}

fn pool_load_refuses_non_finite<T: KernelElement>() {
    for dev in devices() {
        let mut pool = AdapterPool::<T>::new(&dev, CFG).unwrap();
        let (a, b) = weights::<T>(1, 3);
        pool.load(0, &a, &b, 3, 0.5).unwrap();
        let before = pool_bits(&pool);
        for slot in [0, 1] {
            for (operand, index, value) in poisons(2) {
                let (mut a, mut b) = weights::<T>(2, 2);
                let target = if operand == "a" { &mut a } else { &mut b };
                target[index] = T::from_f32(value);
                let err = pool.load(slot, &a, &b, 2, 1.0).unwrap_err();
                expect_non_finite(err, operand, index, value);
                assert_eq!(
                    pool_bits(&pool),
                    before,
                    "slot {slot} changed on {}",
                    dev.name()
                );
            }
        }
    }
}

#[test]
fn pool_load_refuses_non_finite_weights_f32() {
    pool_load_refuses_non_finite::<f32>();
}

#[test]
fn pool_load_refuses_non_finite_weights_f16() {
    pool_load_refuses_non_finite::<f16>();
}

#[test]
fn pool_load_refuses_non_finite_weights_bf16() {
    pool_load_refuses_non_finite::<bf16>();
}

/// An optimizer with slot 0 trained for a step and slot 1 loaded.
fn trained<T: KernelElement>(dev: &Device) -> (AdapterPool<T>, SlotOptimizer) {
    let mut pool = AdapterPool::<T>::new(dev, CFG).unwrap();
    let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default()).unwrap();
    for (slot, rank) in [(0, 3), (1, 1)] {
        let (a, b) = weights::<f32>(10 + slot as u64, rank);
        opt.load_adapter(&mut pool, slot, &a, &b, rank, 1.0, HYPER)
            .unwrap();
    }
    step(&mut opt, &mut pool, 20).unwrap();
    (pool, opt)
}

/// Every refused `load_adapter` into slot 0 leaves pool and optimizer as a
/// twin that never saw it: now, and after one more step (the moments, step
/// counts, settings and anchors the step reads).
#[test]
fn load_adapter_refuses_bad_values_and_changes_nothing() {
    let invalid_lr = SlotHyper { lr: -1.0, ..HYPER };
    for dev in devices() {
        let (mut pool, mut opt) = trained::<f16>(&dev);
        let (mut twin_pool, mut twin) = trained::<f16>(&dev);
        let before = (pool_bits(&pool), optimizer_bits(&opt, &pool, &[0, 1]));
        let (a, b) = weights::<f32>(30, 2);
        let mut attempt = |a: &[f32], b: &[f32], scale, hyper| {
            let err = opt
                .load_adapter(&mut pool, 0, a, b, 2, scale, hyper)
                .unwrap_err();
            let now = (pool_bits(&pool), optimizer_bits(&opt, &pool, &[0, 1]));
            assert!(now == before, "{err} changed the state on {}", dev.name());
            err
        };
        for (operand, index, value) in poisons(2) {
            let (mut a, mut b) = (a.clone(), b.clone());
            let target = if operand == "a" { &mut a } else { &mut b };
            target[index] = value;
            expect_non_finite(attempt(&a, &b, 1.0, HYPER), operand, index, value);
        }
        // Finite in f32, Inf in f16.
        let mut big = b.clone();
        big[3] = -70000.0;
        match attempt(&a, &big, 1.0, HYPER) {
            Error::OutOfRange {
                operand: "b",
                index: 3,
                value: -70000.0,
                dtype: DType::F16,
            } => {}
            other => panic!("{other:?}"),
        }
        let err = attempt(&a, &b, 1.0, invalid_lr);
        assert!(
            matches!(err, Error::InvalidArgument { name: "lr", .. }),
            "{err}"
        );
        let err = attempt(&a, &b, f32::NAN, HYPER);
        assert!(
            matches!(err, Error::InvalidArgument { name: "scale", .. }),
            "{err}"
        );
        let err = attempt(&a, &b[1..], 1.0, HYPER);
        assert!(matches!(err, Error::Shape { operand: "b", .. }), "{err}");

        step(&mut opt, &mut pool, 40).unwrap();
        step(&mut twin, &mut twin_pool, 40).unwrap();
        assert_eq!(pool_bits(&pool), pool_bits(&twin_pool));
        assert_eq!(
            optimizer_bits(&opt, &pool, &[0, 1]),
            optimizer_bits(&twin, &twin_pool, &[0, 1])
        );
    }
}

/// Another pool of the very same shape is not the optimizer's pool: steps
/// and loads on it are refused, and neither pool changes.
#[test]
fn another_pool_of_the_same_config_is_refused() {
    for dev in devices() {
        let (mut pool, mut opt) = trained::<bf16>(&dev);
        let mut other = AdapterPool::<bf16>::new(&dev, CFG).unwrap();
        let (a, b) = weights::<bf16>(5, 2);
        other.load(1, &a, &b, 2, 1.0).unwrap();
        let before = (
            pool_bits(&pool),
            pool_bits(&other),
            optimizer_bits(&opt, &pool, &[0, 1]),
        );
        let err = step(&mut opt, &mut other, 50).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: "pool", .. }),
            "{err}"
        );
        let (a, b) = weights::<f32>(6, 2);
        let err = opt
            .load_adapter(&mut other, 2, &a, &b, 2, 1.0, HYPER)
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: "pool", .. }),
            "{err}"
        );
        let after = (
            pool_bits(&pool),
            pool_bits(&other),
            optimizer_bits(&opt, &pool, &[0, 1]),
        );
        assert!(
            after == before,
            "a refused call changed a pool on {}",
            dev.name()
        );
        step(&mut opt, &mut pool, 50).unwrap();
    }
}

/// `pool.load` into a slot the optimizer trains would be undone by the next
/// step: the step is refused (naming the slot) and changes nothing, until the
/// slot is deactivated or reloaded through the optimizer. Evicting alone is
/// harmless: the slot is empty, and the step skips it.
#[test]
fn a_slot_reloaded_through_the_pool_stops_the_step() {
    for dev in devices() {
        let (mut pool, mut opt) = trained::<bf16>(&dev);
        let (a, b) = weights::<bf16>(7, 2);
        pool.load(1, &a, &b, 2, 0.5).unwrap();
        let before = (pool_bits(&pool), optimizer_bits(&opt, &pool, &[0, 1]));
        let err = step(&mut opt, &mut pool, 60).unwrap_err();
        assert!(matches!(err, Error::SlotChanged { slot: 1 }), "{err}");
        assert!(err.to_string().contains("load_adapter"), "{err}");
        assert!((pool_bits(&pool), optimizer_bits(&opt, &pool, &[0, 1])) == before);

        // Deactivated, slot 1 keeps the pool's adapter; slot 0 steps.
        opt.set_active(1, false).unwrap();
        step(&mut opt, &mut pool, 61).unwrap();
        assert_eq!(pool_bits(&pool)[1], before.0[1]);
        assert_eq!(opt.steps().unwrap(), vec![2, 1, 0]);

        // Evicted while active: skipped, nothing to overwrite.
        pool.evict(0).unwrap();
        step(&mut opt, &mut pool, 62).unwrap();
        assert_eq!(opt.statuses().unwrap()[0], SlotStatus::Idle);
        assert_eq!(opt.steps().unwrap(), vec![2, 1, 0]);
        // ... but loaded again through the pool: refused.
        pool.load(0, &a, &b, 2, 0.5).unwrap();
        let err = step(&mut opt, &mut pool, 63).unwrap_err();
        assert!(matches!(err, Error::SlotChanged { slot: 0 }), "{err}");

        // Reloaded through the optimizer, it trains again.
        let (a, b) = weights::<f32>(8, 2);
        opt.load_adapter(&mut pool, 0, &a, &b, 2, 1.0, HYPER)
            .unwrap();
        step(&mut opt, &mut pool, 64).unwrap();
        assert_eq!(opt.steps().unwrap(), vec![1, 1, 0]);
    }
}

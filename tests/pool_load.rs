//! Loading adapters from device memory (`AdapterPool::load_device`,
//! `AdapterSet::load_device`, kernels/pool_load.cu) against the reference,
//! a load from host slices: the pools must end up bit-identical and serve
//! bit-identical outputs; NaN and Inf anywhere are refused with nothing
//! changed.
mod common;

use common::{devices, random, rng};
use half::{bf16, f16};
use lora_kernels::ops::multi_adapter_forward::{Routing, multi_adapter_forward};
use lora_kernels::peft::{AdapterSet, ModuleSpec};
use lora_kernels::{
    AdapterPool, Device, DeviceAdapter, Element, Error, KernelElement, PoolConfig, SlotAdapter,
};

const CFG: PoolConfig = PoolConfig {
    slots: 3,
    max_rank: 12,
    n: 37,
    k: 29,
};

fn snapshot<T: KernelElement>(pool: &AdapterPool<T>) -> Vec<Option<SlotAdapter<T>>> {
    (0..pool.config().slots)
        .map(|s| pool.adapter(s).unwrap())
        .collect()
}

/// y for tokens of every slot and the base model.
fn serve<T: KernelElement>(dev: &Device, pool: &AdapterPool<T>) -> Vec<T> {
    let m = 5;
    let x = dev.upload(&random::<T>(&mut rng(1), m * CFG.k)).unwrap();
    let w = dev
        .upload(&random::<T>(&mut rng(2), CFG.n * CFG.k))
        .unwrap();
    let ids = dev.upload(&[0i32, 1, 2, -1, 1]).unwrap();
    let mut y = dev.zeros::<T>(m * CFG.n).unwrap();
    multi_adapter_forward(
        pool,
        m,
        &x,
        &w,
        &Routing::Tokens((&ids).into()),
        0.0,
        &mut y,
    )
    .unwrap();
    dev.download(&y).unwrap()
}

/// Device loads of ranks 1, 5 and max_rank, each over a slot that held a
/// max-rank adapter (the padding past a smaller rank must be zeros again),
/// match host loads bit for bit.
fn device_loads_match_host_loads<T: KernelElement>(dev: &Device) {
    let mut by_host = AdapterPool::<T>::new(dev, CFG).unwrap();
    let mut by_device = AdapterPool::<T>::new(dev, CFG).unwrap();
    let mut r = rng(3);
    let full = (
        random::<T>(&mut r, 12 * CFG.k),
        random::<T>(&mut r, CFG.n * 12),
    );
    for (slot, rank) in [(0, 1), (1, 5), (2, 12)] {
        for pool in [&mut by_host, &mut by_device] {
            pool.load(slot, &full.0, &full.1, 12, 0.5).unwrap();
        }
        let (a, b) = (
            random::<T>(&mut r, rank * CFG.k),
            random::<T>(&mut r, CFG.n * rank),
        );
        let scale = 0.25 + rank as f32;
        by_host.load(slot, &a, &b, rank, scale).unwrap();
        let (ad, bd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
        by_device.load_device(slot, &ad, &bd, rank, scale).unwrap();
    }
    assert!(snapshot(&by_host) == snapshot(&by_device), "{:?}", T::DTYPE);
    let (yh, yd) = (serve(dev, &by_host), serve(dev, &by_device));
    assert!(
        yh.iter()
            .zip(&yd)
            .all(|(h, d)| h.to_bits_u64() == d.to_bits_u64()),
        "{:?}: served y differs",
        T::DTYPE
    );
}

trait Bits {
    fn to_bits_u64(&self) -> u64;
}
impl<T: Element> Bits for T {
    fn to_bits_u64(&self) -> u64 {
        self.to_f64().to_bits()
    }
}

#[test]
fn device_loads_match_host_loads_bit_for_bit() {
    for dev in devices() {
        device_loads_match_host_loads::<f32>(&dev);
        device_loads_match_host_loads::<f16>(&dev);
        device_loads_match_host_loads::<bf16>(&dev);
    }
}

/// NaN or Inf in a or b: `Error::NonFinite` naming the operand and the first
/// index, nothing changed; wrong sizes, slots and ranks: errors too.
fn bad_device_loads_change_nothing<T: KernelElement>(dev: &Device) {
    let mut pool = AdapterPool::<T>::new(dev, CFG).unwrap();
    let mut r = rng(4);
    let rank = 4;
    let (a, b) = (
        random::<T>(&mut r, rank * CFG.k),
        random::<T>(&mut r, CFG.n * rank),
    );
    pool.load(1, &a, &b, rank, 2.0).unwrap();
    let before = snapshot(&pool);
    for (operand, index, value) in [
        ("a", 17, f64::NAN),
        ("a", 0, f64::INFINITY),
        ("b", 30, f64::NEG_INFINITY),
        ("b", CFG.n * rank - 1, f64::NAN),
    ] {
        let (mut a2, mut b2) = (a.clone(), b.clone());
        let target = if operand == "a" { &mut a2 } else { &mut b2 };
        target[index] = T::from_f64(value);
        // A second bad value later on: the error names the first.
        let last = target.len() - 1;
        if index < last {
            target[last] = T::from_f64(f64::NAN);
        }
        let (ad, bd) = (dev.upload(&a2).unwrap(), dev.upload(&b2).unwrap());
        match pool.load_device(1, &ad, &bd, rank, 3.0) {
            Err(Error::NonFinite {
                operand: o,
                index: i,
                ..
            }) => assert_eq!((o, i), (operand, index)),
            other => panic!("{operand}[{index}] = {value}: {other:?}"),
        }
        assert!(snapshot(&pool) == before);
    }
    let (ad, bd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
    assert!(matches!(
        pool.load_device(1, &ad, &bd, rank + 1, 1.0),
        Err(Error::Shape { .. })
    ));
    assert!(pool.load_device(3, &ad, &bd, rank, 1.0).is_err());
    assert!(pool.load_device(1, &ad, &bd, rank, f32::NAN).is_err());
    assert!(snapshot(&pool) == before);
}

#[test]
fn bad_device_loads_change_nothing_all_dtypes() {
    for dev in devices() {
        bad_device_loads_change_nothing::<f32>(&dev);
        bad_device_loads_change_nothing::<f16>(&dev);
        bad_device_loads_change_nothing::<bf16>(&dev);
    }
}

/// `AdapterSet::load_device`: all modules at once, like host loads; one
/// module with a NaN and no pool changes.
#[test]
fn adapter_sets_load_from_device_memory_all_or_nothing() {
    let modules = || {
        vec![
            ("q".to_string(), ModuleSpec::linear(29, 37)),
            ("v".to_string(), ModuleSpec::linear(29, 11)),
        ]
    };
    for dev in devices() {
        let mut set = AdapterSet::<bf16>::new(&dev, 2, 8, modules()).unwrap();
        let mut r = rng(5);
        let q = (
            random::<bf16>(&mut r, 3 * 29),
            random::<bf16>(&mut r, 37 * 3),
        );
        let v = (
            random::<bf16>(&mut r, 6 * 29),
            random::<bf16>(&mut r, 11 * 6),
        );
        let up = |x: &Vec<bf16>| dev.upload(x).unwrap();
        let (qa, qb, va, vb) = (up(&q.0), up(&q.1), up(&v.0), up(&v.1));
        let report = set
            .load_device(
                1,
                &[
                    ("q", DeviceAdapter::new(&qa, &qb, 3, 1.5)),
                    ("v", DeviceAdapter::new(&va, &vb, 6, 0.5)),
                ],
            )
            .unwrap();
        assert_eq!(report.loaded, ["q", "v"]);
        let mut host = AdapterPool::<bf16>::new(&dev, set.pool("q").unwrap().config()).unwrap();
        host.load(1, &q.0, &q.1, 3, 1.5).unwrap();
        assert_eq!(
            set.pool("q").unwrap().adapter(1).unwrap(),
            host.adapter(1).unwrap()
        );
        let before: Vec<_> = set.modules().map(|(_, _, p)| snapshot(p)).collect();
        let mut bad_v = v.1.clone();
        bad_v[7] = bf16::NAN;
        let bad_vb = up(&bad_v);
        let err = set
            .load_device(
                0,
                &[
                    ("q", DeviceAdapter::new(&qa, &qb, 3, 1.5)),
                    ("v", DeviceAdapter::new(&va, &bad_vb, 6, 0.5)),
                ],
            )
            .unwrap_err();
        assert!(
            err.to_string().contains('v') && err.to_string().contains("index 7"),
            "{err}"
        );
        let unknown = set.load_device(0, &[("k", DeviceAdapter::new(&qa, &qb, 3, 1.5))]);
        assert!(unknown.unwrap_err().to_string().contains("no pool"));
        let after: Vec<_> = set.modules().map(|(_, _, p)| snapshot(p)).collect();
        assert!(before == after, "a failed device load changed a pool");
    }
}

//! A test model of a pool and a batch routed to it (shared by the tests of
//! the ops and of their candle form): the reference forward (`y`, `t`) and
//! gradients (a per-slot loop of single-adapter references), with
//! docs/DESIGN.md section 3's per-element bounds of each.
use lora_kernels::reference::{self, Adapter, BackwardInputs, Gradients};
use lora_kernels::{AdapterPool, Device, Dims, KernelElement, PoolConfig};

use super::{f32_sum_bound, forward_bound, random, rng, split_terms};

/// Per rank j of a token's adapter: u_j = s sum_c g_c b_cj, and |s| sum_c
/// |g_c b_cj| (u's own f32 sum, counted term by term).
pub fn u_terms<T: KernelElement>(g_row: &[T], ad: &Adapter<'_, T>) -> (Vec<f64>, Vec<f64>) {
    let s = ad.scale as f64;
    (0..ad.rank)
        .map(|j| {
            let prods = g_row
                .iter()
                .enumerate()
                .map(|(c, gc)| gc.to_f64() * ad.b[c * ad.rank + j].to_f64());
            (
                s * prods.clone().sum::<f64>(),
                s.abs() * prods.map(f64::abs).sum::<f64>(),
            )
        })
        .unzip()
}

/// docs/DESIGN.md section 3's bound for each element of dx (`[m, k]`), token
/// `i` using `adapters[i]` (None: `g w` only): one ulp of T plus 4 eps_f32
/// times the sum of |terms| (`sum_c |g w| + sum_j |a_j| sum_c |s g b_j|`,
/// plus the prior value when accumulating), plus the tensor-core kernels'
/// hi + lo split of u ([`split_terms`]: bf16 2^-15 |u_j a_j|, f16 2^-20 of
/// it plus sigma 2^-25 |a_j|).
pub fn dx_bound<T: KernelElement>(
    dims: Dims,
    g: &[T],
    w: &[T],
    adapters: &[Option<Adapter<'_, T>>],
    prior: Option<&[T]>,
    want: &[T],
) -> Vec<f64> {
    let Dims { m, n, k } = dims;
    let mut bound = Vec::with_capacity(m * k);
    for (i, adapter) in adapters.iter().enumerate().take(m) {
        let gi = &g[i * n..(i + 1) * n];
        let (u, u_abs) = adapter
            .as_ref()
            .map_or((vec![], vec![]), |ad| u_terms(gi, ad));
        let (split, subnormal) = split_terms::<T>(&u);
        for q in 0..k {
            let mut abs_sum: f64 = (0..n)
                .map(|c| (gi[c].to_f64() * w[c * k + q].to_f64()).abs())
                .sum();
            let mut extra = 0.0;
            for (j, (&uj, &uj_abs)) in u.iter().zip(&u_abs).enumerate() {
                let aj = adapter.as_ref().unwrap().a[j * k + q].to_f64().abs();
                abs_sum += uj_abs * aj;
                extra += split * (uj * aj).abs() + subnormal[j] * aj;
            }
            abs_sum += prior.map_or(0.0, |p| p[i * k + q].to_f64().abs());
            bound.push(f32_sum_bound::<T>(want[i * k + q].to_f64(), abs_sum) + extra);
        }
    }
    bound
}

/// A pool for the multi-adapter backward: each slot's rank (0 = empty),
/// scale and weights, and the tokens' ids, inputs and saved t.
#[derive(Clone)]
pub struct PoolCase<T> {
    pub dims: Dims,
    pub max_rank: usize,
    pub slots: Vec<(usize, f32, Vec<T>, Vec<T>)>,
    pub ids: Vec<i32>,
    pub g: Vec<T>,
    pub x: Vec<T>,
    pub w: Vec<T>,
    pub t: Vec<f32>,
}

impl<T: KernelElement> PoolCase<T> {
    /// Slot s gets rank `ranks[s]` and scale 0.5 + s.
    pub fn new(dims: Dims, max_rank: usize, ranks: &[usize], ids: Vec<i32>, seed: u64) -> Self {
        let Dims { m, n, k } = dims;
        let mut r = rng(seed);
        let slots = ranks
            .iter()
            .enumerate()
            .map(|(s, &rk)| {
                (
                    rk,
                    0.5 + s as f32,
                    random(&mut r, rk * k),
                    random(&mut r, n * rk),
                )
            })
            .collect();
        let (g, x, w) = (
            random(&mut r, m * n),
            random(&mut r, m * k),
            random(&mut r, n * k),
        );
        let mut case = PoolCase {
            dims,
            max_rank,
            slots,
            ids,
            g,
            x,
            w,
            t: vec![],
        };
        case.save_t();
        case
    }

    /// t as the pool forward saves it: `[m, max_rank]`, unscaled, zero past each rank.
    pub fn save_t(&mut self) {
        let Dims { m, k, .. } = self.dims;
        let mut t = vec![0f32; m * self.max_rank];
        for i in 0..m {
            if let Some(ad) = self.adapter_of(i) {
                for j in 0..ad.rank {
                    t[i * self.max_rank + j] = self.x[i * k..(i + 1) * k]
                        .iter()
                        .zip(&ad.a[j * k..(j + 1) * k])
                        .map(|(p, q)| p.to_f64() * q.to_f64())
                        .sum::<f64>() as f32;
                }
            }
        }
        self.t = t;
    }

    /// A pool on `dev` holding the case's slots (an empty slot stays empty).
    pub fn pool(&self, dev: &Device) -> AdapterPool<T> {
        let Dims { n, k, .. } = self.dims;
        let cfg = PoolConfig {
            slots: self.slots.len(),
            max_rank: self.max_rank,
            n,
            k,
        };
        let mut pool = AdapterPool::<T>::new(dev, cfg).unwrap();
        for (s, (rank, scale, a, b)) in self.slots.iter().enumerate() {
            if *rank > 0 {
                pool.load(s, a, b, *rank, *scale).unwrap();
            }
        }
        pool
    }

    /// The slot token i trains: None for -1, an empty slot or a bad id.
    pub fn slot_of(&self, i: usize) -> Option<usize> {
        let s = usize::try_from(self.ids[i]).ok()?;
        (s < self.slots.len() && self.slots[s].0 > 0).then_some(s)
    }

    pub fn adapter_of(&self, i: usize) -> Option<Adapter<'_, T>> {
        self.slot_of(i).map(|s| {
            let (rank, scale, a, b) = &self.slots[s];
            Adapter {
                a,
                b,
                rank: *rank,
                scale: *scale,
            }
        })
    }

    /// The single-adapter reference per token (dx; `-1`: s = 0, the base
    /// term only), da and db summed per slot in the pool layout.
    pub fn expected(&self) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        let (Dims { m, n, k }, mr, slots) = (self.dims, self.max_rank, self.slots.len());
        let mut dx = vec![T::default(); m * k];
        let (mut da, mut db) = (vec![0f32; slots * mr * k], vec![0f32; slots * n * mr]);
        let (no_a, no_b) = (vec![T::default(); k], vec![T::default(); n]);
        for i in 0..m {
            let adapter = self.adapter_of(i).unwrap_or(Adapter {
                a: &no_a,
                b: &no_b,
                rank: 1,
                scale: 0.0,
            });
            let rk = adapter.rank;
            let ti = self.t[i * mr..i * mr + rk].to_vec();
            let (mut dxi, mut dai, mut dbi) = (
                vec![T::default(); k],
                vec![0f32; rk * k],
                vec![0f32; n * rk],
            );
            let inputs = BackwardInputs {
                g: &self.g[i * n..(i + 1) * n],
                x: &self.x[i * k..(i + 1) * k],
                w: &self.w,
                adapter,
                t: &ti,
            };
            let grads = Gradients {
                dx: Some(&mut dxi),
                da: Some(&mut dai),
                db: Some(&mut dbi),
                accumulate: false,
            };
            reference::backward(Dims::new(1, n, k), &inputs, grads).unwrap();
            dx[i * k..(i + 1) * k].copy_from_slice(&dxi);
            if let Some(s) = self.slot_of(i) {
                for j in 0..rk {
                    for q in 0..k {
                        da[(s * mr + j) * k + q] += dai[j * k + q];
                    }
                    for c in 0..n {
                        db[(s * n + c) * mr + j] += dbi[c * rk + j];
                    }
                }
            }
        }
        (dx, da, db)
    }

    /// The per-element bounds of (dx, da, db): [`dx_bound`] per token, and
    /// the f32 sums of da (`sum_i |u_ij x_iq|`, u term by term) and db
    /// (`sum_i |s g_ic t_ij|`) over each slot's tokens.
    pub fn bounds(&self, want: &(Vec<T>, Vec<f32>, Vec<f32>)) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (Dims { m, n, k }, mr) = (self.dims, self.max_rank);
        let adapters: Vec<_> = (0..m).map(|i| self.adapter_of(i)).collect();
        let dx = dx_bound(self.dims, &self.g, &self.w, &adapters, None, &want.0);
        let (mut da_sum, mut db_sum) = (vec![0f64; want.1.len()], vec![0f64; want.2.len()]);
        for (i, adapter) in adapters.iter().enumerate() {
            let (Some(ad), Some(s)) = (adapter, self.slot_of(i)) else {
                continue;
            };
            let u_abs = u_terms(&self.g[i * n..(i + 1) * n], ad).1;
            for j in 0..ad.rank {
                for q in 0..k {
                    da_sum[(s * mr + j) * k + q] += u_abs[j] * self.x[i * k + q].to_f64().abs();
                }
                for c in 0..n {
                    let term =
                        ad.scale as f64 * self.g[i * n + c].to_f64() * self.t[i * mr + j] as f64;
                    db_sum[(s * n + c) * mr + j] += term.abs();
                }
            }
        }
        let f32_bound = |want: &[f32], sums: Vec<f64>| {
            want.iter()
                .zip(sums)
                .map(|(w, a)| f32_sum_bound::<f32>(*w as f64, a))
                .collect()
        };
        (dx, f32_bound(&want.1, da_sum), f32_bound(&want.2, db_sum))
    }
}

/// The forward side of the model.
impl<T: KernelElement> PoolCase<T> {
    /// `reference::multi_adapter_forward`'s `y` (beta = 0): ids of empty
    /// slots or out of range are served as -1, as the kernels do.
    pub fn expected_y(&self) -> Vec<T> {
        let Dims { m, n, k } = self.dims;
        let (no_a, no_b) = (vec![T::default(); k], vec![T::default(); n]);
        // An empty slot's stand-in; no token is routed to it.
        let empty = Adapter {
            a: &no_a,
            b: &no_b,
            rank: 1,
            scale: 0.0,
        };
        let adapters: Vec<Adapter<'_, T>> = self
            .slots
            .iter()
            .map(|(rank, scale, a, b)| match rank {
                0 => empty,
                _ => Adapter {
                    a,
                    b,
                    rank: *rank,
                    scale: *scale,
                },
            })
            .collect();
        let ids: Vec<i32> = (0..m)
            .map(|i| self.slot_of(i).map_or(-1, |s| s as i32))
            .collect();
        let mut y = vec![T::from_f64(f64::NAN); m * n];
        reference::multi_adapter_forward(self.dims, &self.x, &self.w, &adapters, &ids, 0.0, &mut y)
            .unwrap();
        y
    }

    /// The bound of each element of `y` ([`forward_bound`], each token with
    /// its adapter).
    pub fn y_bounds(&self, want: &[T]) -> Vec<f64> {
        let adapters: Vec<_> = (0..self.dims.m).map(|i| self.adapter_of(i)).collect();
        forward_bound(self.dims, &self.x, &self.w, &adapters, 0.0, &[], want)
    }

    /// The bound of each element of `t` (`[m, max_rank]`, an f32 sum of
    /// `x a_j` per token and rank; 0 past a token's rank and for tokens
    /// without an adapter, which must then be exactly 0).
    pub fn t_bounds(&self) -> Vec<f64> {
        let (Dims { m, k, .. }, mr) = (self.dims, self.max_rank);
        let mut abs_sum = vec![0f64; m * mr];
        for i in 0..m {
            let Some(ad) = self.adapter_of(i) else {
                continue;
            };
            let xi = &self.x[i * k..(i + 1) * k];
            for j in 0..ad.rank {
                let aj = &ad.a[j * k..(j + 1) * k];
                abs_sum[i * mr + j] = xi
                    .iter()
                    .zip(aj)
                    .map(|(p, q)| (p.to_f64() * q.to_f64()).abs())
                    .sum();
            }
        }
        self.t
            .iter()
            .zip(abs_sum)
            .map(|(&t, a)| f32_sum_bound::<f32>(t as f64, a))
            .collect()
    }

    /// The same case with every slot's scale times `factor` (`t` is unscaled).
    pub fn with_scales_times(&self, factor: f32) -> Self {
        let mut off = self.clone();
        for (_, scale, _, _) in &mut off.slots {
            *scale *= factor;
        }
        off
    }
}

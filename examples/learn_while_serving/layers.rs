//! The decoder's math around its LoRA projections, forward and backward, on
//! f32 candle tensors: RMSNorm, rotary embeddings, causal attention with
//! grouped key/value heads, SwiGLU and the cross-entropy loss. The
//! projections themselves are the crate's kernels (model.rs); every
//! backward here is checked against candle's autograd (grad_check.rs).
use candle_core::{D, DType, Device, Result, Tensor};

/// RMSNorm's epsilon (Llama 3's).
pub const NORM_EPS: f64 = 1e-5;

/// `y = x / rms(x) * gamma` over the last dim; also `1 / rms(x)` per row,
/// which the backward needs.
pub fn rms_norm(x: &Tensor, gamma: &Tensor) -> Result<(Tensor, Tensor)> {
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + NORM_EPS)?
        .sqrt()?
        .recip()?;
    Ok((x.broadcast_mul(&inv_rms)?.broadcast_mul(gamma)?, inv_rms))
}

/// `dL/dx` of [`rms_norm`] for `dy = dL/dy`: with `h = dy * gamma` and
/// `r = 1 / rms(x)`, `dx = r h - x r^3 mean(x h)`.
pub fn rms_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    inv_rms: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    let h = dy.broadcast_mul(gamma)?;
    let mean_xh = (x * &h)?.mean_keepdim(D::Minus1)?;
    let r3 = inv_rms.powf(3.0)?;
    h.broadcast_mul(inv_rms)? - x.broadcast_mul(&(r3 * mean_xh)?)?
}

/// `silu(gate) * up` (SwiGLU's gating).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    silu(gate)? * up
}

/// `dL/dgate`, `dL/dup` of [`swiglu`] for `dact`; `silu'(z) = s (1 + z (1 - s))`
/// with `s = sigmoid(z)`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dact: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = sigmoid(gate)?;
    let dsilu = (&s * ((gate * (1.0 - &s)?)? + 1.0)?)?;
    Ok((((dact * up)? * dsilu)?, (dact * silu(gate)?)?))
}

fn sigmoid(z: &Tensor) -> Result<Tensor> {
    (z.neg()?.exp()? + 1.0)?.recip()
}

fn silu(z: &Tensor) -> Result<Tensor> {
    z * sigmoid(z)?
}

/// Rotary position embeddings (Llama's half-split form) for heads of
/// `head_dim`: `x cos + rotate_half(x) sin` per position.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, max_seq: usize, theta: f64, dev: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let angle = |pos: usize, i: usize| {
            let freq = theta.powf(-2.0 * (i % half) as f64 / head_dim as f64);
            pos as f64 * freq
        };
        let table = |f: fn(f64) -> f64| {
            let v: Vec<f32> = (0..max_seq * head_dim)
                .map(|e| f(angle(e / head_dim, e % head_dim)) as f32)
                .collect();
            Tensor::from_vec(v, (max_seq, head_dim), dev)
        };
        Ok(Rope {
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
        })
    }

    /// `x` `[batch, heads, seq, head_dim]` rotated by position.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = self.tables(x)?;
        x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
    }

    /// The backward of [`Rope::apply`]: `rotate_half`'s transpose is
    /// `-rotate_half`, so `dx = g cos - rotate_half(g sin)`.
    pub fn backward(&self, g: &Tensor) -> Result<Tensor> {
        let (cos, sin) = self.tables(g)?;
        g.broadcast_mul(&cos)? - rotate_half(&g.broadcast_mul(&sin)?)?
    }

    fn tables(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq = x.dim(2)?;
        Ok((self.cos.narrow(0, 0, seq)?, self.sin.narrow(0, 0, seq)?))
    }
}

/// `[x1, x2] -> [-x2, x1]` over the last dim's halves.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Causal self-attention over `batch` sequences of `seq` tokens, with
/// `heads` query heads sharing `kv_heads` key/value heads (grouped-query
/// attention, as in Llama 3).
#[derive(Debug, Clone, Copy)]
pub struct Attention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What the attention's backward needs: rotated `q`, the keys and values
/// repeated per query head, and the attention probabilities.
pub struct AttentionSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    batch: usize,
    seq: usize,
}

impl Attention {
    /// `q` `[tokens, heads * head_dim]`, `k`, `v` `[tokens, kv_heads *
    /// head_dim]` (tokens = batch * seq, sequence-major) to the heads'
    /// outputs `[tokens, heads * head_dim]`.
    pub fn forward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (batch, seq): (usize, usize),
        rope: &Rope,
    ) -> Result<(Tensor, AttentionSaved)> {
        let q = rope.apply(&self.split(q, self.heads, batch, seq)?)?;
        let k = self.repeat_kv(&rope.apply(&self.split(k, self.kv_heads, batch, seq)?)?)?;
        let v = self.repeat_kv(&self.split(v, self.kv_heads, batch, seq)?)?;
        let scores = (q.matmul(&k.t()?)? * self.softmax_scale())?;
        let p = softmax(&scores.broadcast_add(&causal_mask(seq, q.device())?)?)?;
        let out = self.merge(&p.matmul(&v)?)?;
        let saved = AttentionSaved {
            q,
            k,
            v,
            p,
            batch,
            seq,
        };
        Ok((out, saved))
    }

    /// `dL/dq`, `dL/dk`, `dL/dv` (the projections' output layouts) for
    /// `dout = dL/d(forward's output)`.
    pub fn backward(
        &self,
        s: &AttentionSaved,
        dout: &Tensor,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dout = self.split(dout, self.heads, s.batch, s.seq)?;
        let dv = s.p.t()?.matmul(&dout)?;
        let dp = dout.matmul(&s.v.t()?)?;
        // Softmax: ds = p (dp - sum(dp p)).
        let ds = (&s.p * dp.broadcast_sub(&(&dp * &s.p)?.sum_keepdim(D::Minus1)?)?)?;
        let ds = (ds * self.softmax_scale())?;
        let dq = rope.backward(&ds.matmul(&s.k)?)?;
        let dk = rope.backward(&self.sum_kv(&ds.t()?.matmul(&s.q)?)?)?;
        let dv = self.sum_kv(&dv)?;
        Ok((self.merge(&dq)?, self.merge(&dk)?, self.merge(&dv)?))
    }

    fn softmax_scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// `[tokens, heads * head_dim]` to `[batch, heads, seq, head_dim]`.
    fn split(&self, x: &Tensor, heads: usize, batch: usize, seq: usize) -> Result<Tensor> {
        x.reshape((batch, seq, heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// The inverse of [`Self::split`].
    fn merge(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, heads, seq, hd) = x.dims4()?;
        x.transpose(1, 2)?
            .contiguous()?
            .reshape((batch * seq, heads * hd))
    }

    /// Key/value head `j` serves query heads `j * group ..< (j + 1) * group`.
    fn repeat_kv(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, kv, seq, hd) = x.dims4()?;
        let group = self.heads / self.kv_heads;
        x.unsqueeze(2)?
            .expand((batch, kv, group, seq, hd))?
            .contiguous()?
            .reshape((batch, kv * group, seq, hd))
    }

    /// The backward of [`Self::repeat_kv`]: each key/value head's gradient
    /// is the sum over the query heads it serves.
    fn sum_kv(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, _, seq, hd) = x.dims4()?;
        let group = self.heads / self.kv_heads;
        x.reshape((batch, self.kv_heads, group, seq, hd))?.sum(2)
    }
}

/// 0 on and below the diagonal, -inf above (no token sees a later one).
fn causal_mask(seq: usize, dev: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq * seq)
        .map(|e| {
            if e % seq > e / seq {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (seq, seq), dev)
}

/// Softmax over the last dim.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Each token's cross-entropy loss: `logits` `[tokens, vocab]`, `targets`
/// one per token.
pub fn token_losses(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let picked = logits
        .gather(&target_ids(targets, logits.device())?, 1)?
        .squeeze(1)?;
    (logits.log_sum_exp(D::Minus1)? - picked)?.to_vec1()
}

/// `dL/dlogits` for `L = sum_i weight_i loss_i`: `weight_i (softmax_i -
/// onehot(target_i))`.
pub fn token_losses_backward(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let (tokens, vocab) = logits.dims2()?;
    let mut onehot = vec![0f32; tokens * vocab];
    for (i, &t) in targets.iter().enumerate() {
        onehot[i * vocab + t as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (tokens, vocab), logits.device())?;
    let weights = Tensor::from_slice(weights, (tokens, 1), logits.device())?;
    (softmax(logits)? - onehot)?.broadcast_mul(&weights)
}

fn target_ids(targets: &[u32], dev: &Device) -> Result<Tensor> {
    Tensor::from_slice(targets, (targets.len(), 1), dev)?.to_dtype(DType::U32)
}

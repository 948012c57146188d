//! A Llama-architecture decoder (RMSNorm, rotary grouped-query attention,
//! SwiGLU MLP) whose seven projections per layer carry every user's LoRA
//! adapter: the crate's multi-adapter kernels serve them, one slot id per
//! token, from an `AdapterSet` (a pool per projection, PEFT's module paths).
//! The base (embeddings, norms, projections, lm_head) is frozen, drawn from a
//! fixed seed. The training forward keeps what the backward needs; the
//! backward runs the crate's adapter-gradient kernels for the projections and
//! layers.rs for the rest, and the fused optimizer steps every pool.
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use lora_kernels::PoolGrads;
use lora_kernels::candle::CandleElement;
use lora_kernels::candle::lora_backward::{
    BackwardRequest, multi_adapter_backward_into, multi_adapter_backward_with_scratch,
};
use lora_kernels::candle::multi_adapter_forward::{
    multi_adapter_forward, multi_adapter_forward_saving_t,
};
use lora_kernels::ops::adamw::{AdamWConfig, SlotOptimizer};
use lora_kernels::ops::lora_backward::BackwardScratch;
use lora_kernels::peft::{AdapterSet, ModuleSpec};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::layers::{self, Attention, AttentionSaved, Rope};

/// The projections of a layer, by PEFT's module names.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
/// Rotary embeddings' base (Llama 2's; Llama 3 uses 500000).
const ROPE_THETA: f64 = 10000.0;
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The model's shape and its adapter pools'.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub max_seq: usize,
    /// Adapter slots (one per user served at a time) and their largest rank.
    pub slots: usize,
    pub max_rank: usize,
}

impl Config {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// (in_features, out_features) of projection `p`.
    pub fn shape(&self, p: usize) -> (usize, usize) {
        let (d, kv, f) = (
            self.hidden,
            self.kv_heads * self.head_dim(),
            self.intermediate,
        );
        [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)][p]
    }

    /// PEFT's path of projection `p` of `layer`.
    pub fn path(layer: usize, p: usize) -> String {
        format!("model.layers.{layer}.{}", PROJECTIONS[p])
    }

    fn attention(&self) -> Attention {
        Attention {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim(),
        }
    }
}

/// One decoder layer's frozen weights: the norms' gains (f32) and the
/// projections' `[out, in]` weights in the kernels' type.
struct Layer {
    attn_norm: Tensor,
    mlp_norm: Tensor,
    w: Vec<Tensor>,
}

pub struct Model<T> {
    pub cfg: Config,
    dev: Device,
    embed: Tensor,
    lm_head: Tensor,
    final_norm: Tensor,
    layers: Vec<Layer>,
    rope: Rope,
    paths: Vec<[String; 7]>,
    /// Every user's adapters: a pool per projection, keyed by PEFT path.
    pub adapters: AdapterSet<T>,
    /// The fused optimizer of each pool, by the same paths.
    pub optimizers: BTreeMap<String, SlotOptimizer>,
    /// The projections' backward scratch, kept between steps.
    scratch: RefCell<BackwardScratch>,
    /// Each pool's gradients and their statistics, kept between steps.
    grads: RefCell<BTreeMap<String, PoolGrads>>,
}

/// A batch: `seqs` sequences of `seq` tokens each (sequence-major), and
/// each token's adapter slot (-1: the base model only).
pub struct Batch {
    pub tokens: Vec<u32>,
    pub ids: Vec<i32>,
    pub seqs: usize,
    pub seq: usize,
}

/// Each projection's saved input (the kernels' type) and `t = x a^T`.
type ProjSaved = (Tensor, Tensor);

/// What one layer's backward needs from the training forward.
struct LayerTape {
    x0: Tensor,
    inv_rms1: Tensor,
    attention: AttentionSaved,
    x1: Tensor,
    inv_rms2: Tensor,
    gate: Tensor,
    up: Tensor,
    proj: Vec<ProjSaved>,
}

/// The training forward's record.
pub struct Tape {
    /// The tokens' slots as a tensor (the training forward's).
    ids: Option<Tensor>,
    layers: Vec<LayerTape>,
    x_final: Tensor,
    inv_rms_final: Tensor,
    pub logits: Tensor,
}

/// The adapters' gradients per module path: `da` `[slots, max_rank, in]`,
/// `db` `[slots, out, max_rank]` (f32, the pools' layout).
pub type AdapterGrads = BTreeMap<String, (Tensor, Tensor)>;

impl<T: CandleElement> Model<T> {
    /// A model whose frozen base comes from `seed`, with empty adapter pools
    /// and an optimizer per pool.
    pub fn new(cfg: Config, dev: &Device, seed: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = cfg.hidden;
        let mut layers = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            let mut w = Vec::with_capacity(PROJECTIONS.len());
            for p in 0..PROJECTIONS.len() {
                let (k, n) = cfg.shape(p);
                w.push(
                    gaussian(&mut rng, &[n, k], 1.0 / (k as f32).sqrt(), dev)?
                        .to_dtype(kernel_dtype::<T>())?,
                );
            }
            layers.push(Layer {
                attn_norm: gain(&mut rng, d, dev)?,
                mlp_norm: gain(&mut rng, d, dev)?,
                w,
            });
        }
        let paths: Vec<[String; 7]> = (0..cfg.layers)
            .map(|l| std::array::from_fn(|p| Config::path(l, p)))
            .collect();
        let modules = paths.iter().flatten().enumerate().map(|(i, path)| {
            let (k, n) = cfg.shape(i % PROJECTIONS.len());
            (path.clone(), ModuleSpec::linear(k, n))
        });
        let kernels_dev = lora_kernels::candle::device(dev)?;
        let adapters = AdapterSet::<T>::new(&kernels_dev, cfg.slots, cfg.max_rank, modules)?;
        let (mut optimizers, mut grads) = (BTreeMap::new(), BTreeMap::new());
        for (path, _, pool) in adapters.modules() {
            optimizers.insert(
                path.to_string(),
                SlotOptimizer::new(pool, AdamWConfig::default())?,
            );
            grads.insert(path.to_string(), PoolGrads::new(pool)?);
        }
        Ok(Model {
            embed: gaussian(&mut rng, &[cfg.vocab, d], 1.0, dev)?,
            lm_head: gaussian(&mut rng, &[cfg.vocab, d], 1.0 / (d as f32).sqrt(), dev)?,
            final_norm: gain(&mut rng, d, dev)?,
            rope: Rope::new(cfg.head_dim(), cfg.max_seq, ROPE_THETA, dev)?,
            dev: dev.clone(),
            cfg,
            layers,
            paths,
            scratch: RefCell::new(BackwardScratch::new(&kernels_dev)?),
            grads: RefCell::new(grads),
            adapters,
            optimizers,
        })
    }

    /// The serving forward: the batch's logits `[tokens, vocab]` (f32).
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        let ids = Tensor::new(batch.ids.as_slice(), &self.dev)?;
        let mut serve = |l: usize, p: usize, x: &Tensor| -> Result<Tensor> {
            let x = x.to_dtype(kernel_dtype::<T>())?;
            multi_adapter_forward(self.pool(l, p), &x, &self.layers[l].w[p], &ids)?
                .to_dtype(DType::F32)
        };
        Ok(self.run(batch, &mut serve)?.logits)
    }

    /// The training forward: the logits, and what [`Self::backward`] needs.
    pub fn forward_train(&self, batch: &Batch) -> Result<Tape> {
        let ids = Tensor::new(batch.ids.as_slice(), &self.dev)?;
        let mut saved = Vec::new();
        let mut train = |l: usize, p: usize, x: &Tensor| -> Result<Tensor> {
            let x = x.to_dtype(kernel_dtype::<T>())?;
            let w = &self.layers[l].w[p];
            let (y, t) = multi_adapter_forward_saving_t(self.pool(l, p), &x, w, &ids)?;
            saved.push((x, t));
            y.to_dtype(DType::F32)
        };
        let mut tape = self.run(batch, &mut train)?;
        let per_layer = PROJECTIONS.len();
        for (l, layer) in tape.layers.iter_mut().enumerate() {
            layer.proj = saved[l * per_layer..(l + 1) * per_layer].to_vec();
        }
        tape.ids = Some(ids);
        Ok(tape)
    }

    /// The decoder over `batch`, each projection computed by `project(layer,
    /// p, x)` (in the order of [`PROJECTIONS`] within a layer): the crate's
    /// kernels, or the unfused computation of the gradient check.
    pub fn run(
        &self,
        batch: &Batch,
        project: &mut dyn FnMut(usize, usize, &Tensor) -> Result<Tensor>,
    ) -> Result<Tape> {
        let tokens = Tensor::new(batch.tokens.as_slice(), &self.dev)?;
        let mut x = self.embed.index_select(&tokens, 0)?;
        let mut tapes = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let (h, inv_rms1) = layers::rms_norm(&x, &layer.attn_norm)?;
            let (q, k, v) = (project(l, Q, &h)?, project(l, K, &h)?, project(l, V, &h)?);
            let (attn, attention) =
                self.cfg
                    .attention()
                    .forward((&q, &k, &v), (batch.seqs, batch.seq), &self.rope)?;
            let x1 = (&x + project(l, O, &attn)?)?;
            let (h, inv_rms2) = layers::rms_norm(&x1, &layer.mlp_norm)?;
            let (gate, up) = (project(l, GATE, &h)?, project(l, UP, &h)?);
            let act = layers::swiglu(&gate, &up)?;
            let x2 = (&x1 + project(l, DOWN, &act)?)?;
            tapes.push(LayerTape {
                x0: x,
                inv_rms1,
                attention,
                x1,
                inv_rms2,
                gate,
                up,
                proj: Vec::new(),
            });
            x = x2;
        }
        let (h, inv_rms_final) = layers::rms_norm(&x, &self.final_norm)?;
        let logits = h.matmul(&self.lm_head.t()?)?;
        Ok(Tape {
            ids: None,
            layers: tapes,
            x_final: x,
            inv_rms_final,
            logits,
        })
    }

    /// Whether the model runs on a GPU (candle's CUDA device).
    pub fn on_gpu(&self) -> bool {
        self.dev.is_cuda()
    }

    /// The frozen base weight of projection `p` of `layer` (`[out, in]`).
    pub fn weight(&self, layer: usize, p: usize) -> &Tensor {
        &self.layers[layer].w[p]
    }

    /// The adapters' gradients of `L = sum_i weights_i loss_i(targets_i)`
    /// over the tape's tokens, as tensors (the gradient check compares them
    /// with candle's autograd). Only the projections' adapters learn.
    pub fn backward(&self, tape: &Tape, targets: &[u32], weights: &[f32]) -> Result<AdapterGrads> {
        let ids = tape.ids.as_ref().expect("a tape of forward_train");
        let mut grads = AdapterGrads::new();
        self.backward_pass(tape, targets, weights, |l, p, inputs, req| {
            let mut scratch = self.scratch.borrow_mut();
            let r = multi_adapter_backward_with_scratch(
                self.pool(l, p),
                inputs,
                ids,
                req,
                &mut scratch,
            )?;
            let (da, db) = (r.da.expect("asked for da"), r.db.expect("asked for db"));
            grads.insert(self.paths[l][p].clone(), (da, db));
            Ok(r.dx)
        })?;
        Ok(grads)
    }

    /// One learning step from the tape: the backward pass into each pool's
    /// `PoolGrads`, which keep their statistics, then one AdamW step of every
    /// pool (a launch over all its slots: the active ones step), which takes
    /// the norms from those statistics and so reads each gradient once.
    pub fn learn(&mut self, tape: &Tape, targets: &[u32], weights: &[f32]) -> Result<()> {
        let ids = tape.ids.as_ref().expect("a tape of forward_train");
        self.backward_pass(tape, targets, weights, |l, p, inputs, req| {
            let mut scratch = self.scratch.borrow_mut();
            let mut grads = self.grads.borrow_mut();
            let grads = grads
                .get_mut(&self.paths[l][p])
                .expect("gradients per pool");
            multi_adapter_backward_into(self.pool(l, p), inputs, ids, grads, req, &mut scratch)
        })?;
        let grads = self.grads.borrow();
        for (path, opt) in &mut self.optimizers {
            let pool = self.adapters.pool_mut(path).expect("a pool per optimizer");
            opt.step_pool_grads(pool, &grads[path])?;
        }
        Ok(())
    }

    /// The backward pass through the frozen model: `project(layer,
    /// projection, (g, x, w, t), request)` runs each projection's adapter
    /// backward and returns its `dx` when asked.
    fn backward_pass(
        &self,
        tape: &Tape,
        targets: &[u32],
        weights: &[f32],
        mut project: impl FnMut(
            usize,
            usize,
            (&Tensor, &Tensor, &Tensor, &Tensor),
            BackwardRequest,
        ) -> Result<Option<Tensor>>,
    ) -> Result<()> {
        let dlogits = layers::token_losses_backward(&tape.logits, targets, weights)?;
        let dh = dlogits.matmul(&self.lm_head)?;
        let mut dx =
            layers::rms_norm_backward(&tape.x_final, &self.final_norm, &tape.inv_rms_final, &dh)?;
        let attention = self.cfg.attention();
        for (l, (layer, lt)) in self.layers.iter().zip(&tape.layers).enumerate().rev() {
            // The first layer's input is the frozen embedding: no dx needed there.
            let need_dx = l > 0;
            let mut back = |p: usize, g: &Tensor, dx: bool| -> Result<Option<Tensor>> {
                let (x, t) = &lt.proj[p];
                let req = BackwardRequest {
                    dx,
                    ..BackwardRequest::default()
                };
                let g = g.to_dtype(kernel_dtype::<T>())?;
                let dx = project(l, p, (&g, x, &layer.w[p], t), req)?;
                dx.map(|dx| dx.to_dtype(DType::F32)).transpose()
            };
            // MLP: x2 = x1 + down(swiglu(gate(h2), up(h2))), h2 = norm(x1).
            let dact = back(DOWN, &dx, true)?.expect("dx");
            let (dgate, dup) = layers::swiglu_backward(&lt.gate, &lt.up, &dact)?;
            let dh2 =
                (back(GATE, &dgate, true)?.expect("dx") + back(UP, &dup, true)?.expect("dx"))?;
            dx = (&dx + layers::rms_norm_backward(&lt.x1, &layer.mlp_norm, &lt.inv_rms2, &dh2)?)?;
            // Attention: x1 = x0 + o(attention(q(h1), k(h1), v(h1))), h1 = norm(x0).
            let dattn = back(O, &dx, true)?.expect("dx");
            let (dq, dk, dv) = attention.backward(&lt.attention, &dattn, &self.rope)?;
            let (dq, dk, dv) = (
                back(Q, &dq, need_dx)?,
                back(K, &dk, need_dx)?,
                back(V, &dv, need_dx)?,
            );
            if let (Some(dq), Some(dk), Some(dv)) = (dq, dk, dv) {
                let dh1 = ((dq + dk)? + dv)?;
                dx = (&dx
                    + layers::rms_norm_backward(&lt.x0, &layer.attn_norm, &lt.inv_rms1, &dh1)?)?;
            }
        }
        Ok(())
    }

    fn pool(&self, layer: usize, p: usize) -> &lora_kernels::AdapterPool<T> {
        self.adapters
            .pool(&self.paths[layer][p])
            .expect("a pool per projection")
    }
}

impl<T: CandleElement> Model<T> {
    /// Writes the frozen base as transformers' `LlamaForCausalLM` names its
    /// parameters (`base.safetensors`, f32) and its `config.json`, so that
    /// the decoder can be checked against transformers and PEFT
    /// (scripts/llama-check.py).
    pub fn export_hf(&self, dir: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        tensors.insert("model.embed_tokens.weight".to_string(), self.embed.clone());
        tensors.insert("model.norm.weight".to_string(), self.final_norm.clone());
        tensors.insert("lm_head.weight".to_string(), self.lm_head.clone());
        for (l, layer) in self.layers.iter().enumerate() {
            let name = |part: &str| format!("model.layers.{l}.{part}.weight");
            tensors.insert(name("input_layernorm"), layer.attn_norm.clone());
            tensors.insert(name("post_attention_layernorm"), layer.mlp_norm.clone());
            for (p, w) in layer.w.iter().enumerate() {
                tensors.insert(name(PROJECTIONS[p]), w.to_dtype(DType::F32)?);
            }
        }
        candle_core::safetensors::save(&tensors, dir.join("base.safetensors"))?;
        let c = &self.cfg;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab,
            "hidden_size": c.hidden,
            "intermediate_size": c.intermediate,
            "num_hidden_layers": c.layers,
            "num_attention_heads": c.heads,
            "num_key_value_heads": c.kv_heads,
            "max_position_embeddings": c.max_seq,
            "rms_norm_eps": layers::NORM_EPS,
            "rope_theta": ROPE_THETA,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "lora_kernels_dtype": format!("{:?}", <T as lora_kernels::Element>::DTYPE),
        });
        std::fs::write(dir.join("config.json"), config.to_string())?;
        Ok(())
    }
}

/// candle's dtype of the kernels' type.
pub fn kernel_dtype<T: CandleElement>() -> DType {
    <T as candle_core::WithDType>::DTYPE
}

/// `[shape]` values from a normal distribution of deviation `std`.
pub fn gaussian(rng: &mut StdRng, shape: &[usize], std: f32, dev: &Device) -> Result<Tensor> {
    let len = shape.iter().product();
    let v: Vec<f32> = (0..len)
        .map(|_| {
            // Box-Muller from two uniforms in (0, 1].
            let (u1, u2): (f32, f32) = (1.0 - rng.random::<f32>(), rng.random::<f32>());
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, dev)
}

/// A norm's gains: near 1.
fn gain(rng: &mut StdRng, d: usize, dev: &Device) -> Result<Tensor> {
    gaussian(rng, &[d], 0.1, dev)? + 1.0
}

//! A model that keeps learning while it serves. A Llama-architecture decoder
//! (RMSNorm, rotary grouped-query attention, SwiGLU) with a frozen base and
//! LoRA adapters on q, k, v, o, gate, up and down of every layer serves many
//! users in every batch, each token through its own user's adapters; in the
//! same loop, the users whose feedback arrived train their adapters (a
//! training forward, the adapters' backward, one fused AdamW launch per
//! projection over all slots). Users join and leave: their adapters are
//! saved as PEFT directories with their optimizer state, evicted, and
//! loaded again later into another slot, continuing exactly where they
//! stopped.
//!
//! Each user teaches a private token mapping and later switches to a new
//! one. Every user is served twice, as two learners with identical data:
//! one plain, one with the stability option (from its second task on, a
//! pull toward the adapter as it was when that task began), so that forgetting is measured with and
//! without it in the same run. A user who never trains, and base-only
//! traffic, check that nobody else's training changes their outputs (bit
//! for bit). Printed: per-user loss on the current and earlier tasks over
//! time, forgetting, interference, throughput; plotted to a PNG.
//!
//!     cargo run --release --features candle --example learn_while_serving
//!
//! On candle's CPU device the kernels run on the host runtime (a small
//! model); built with `--features candle-cuda` on a GPU machine the loop
//! runs on the GPU, and the throughput is measured at Llama-3-8B's
//! projection shapes. It exits with an error when a check fails.
mod events;
mod grad_check;
mod layers;
mod model;
mod plot;
mod probe;
mod report;
mod tasks;
mod throughput;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;
use half::bf16;
use lora_kernels::candle::CandleElement;
use lora_kernels::peft::{LoadOptions, ModuleAdapter, PeftAdapter};
use lora_kernels::{DType, Element};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use events::Event;
use model::{Batch, Config, Model, PROJECTIONS};
use probe::Probe;
use tasks::{EVAL_SEQ, EVAL_SEQS, Stream};
use throughput::throughput;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The demo's model: small enough for the host runtime, and no dimension a
/// multiple of any kernel tile.
const DEMO: Config = Config {
    vocab: 48,
    hidden: 40,
    heads: 4,
    kv_heads: 2,
    intermediate: 104,
    layers: 2,
    max_seq: 16,
    slots: 8,
    max_rank: 4,
};
/// Steps of the stream; every EVAL_EVERY steps each learner's loss on each
/// of its tasks so far is measured.
const STEPS: usize = 96;
const EVAL_EVERY: usize = 6;
/// Per learner and step: sequences served, their length, and the chance
/// that their feedback arrives (then the learner trains on them).
const SERVE_SEQS: usize = 1;
const SEQ: usize = 8;
const FEEDBACK: f64 = 0.8;
/// Base-only sequences (no adapter) in every served batch.
const BASE_SEQS: usize = 2;
const LR: f32 = 2e-2;
const ANCHOR_PULL: f32 = 0.5;

/// One adapter being served and trained: a user's, plain or anchored.
struct Learner {
    user: usize,
    anchor: bool,
    slot: Option<usize>,
    saved: Option<PathBuf>,
    /// Per task: (step, held-out loss).
    curves: Vec<Vec<(usize, f32)>>,
}

impl Learner {
    fn name(&self, users: &[Stream]) -> String {
        let plain = users[self.user].name;
        if self.anchor {
            format!("{plain}+anchor")
        } else {
            plain.to_string()
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("learn_while_serving: a check failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("learn_while_serving: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<bool> {
    let (dev, gpu) = pick_device();
    println!(
        "learn_while_serving on {}",
        if gpu {
            "the GPU (candle's CUDA device)"
        } else {
            "candle's CPU device: the kernels run on the host runtime (no GPU used)"
        }
    );
    let ok = grad_check::run(&dev)?;
    // bf16 on a GPU; f32 on the host runtime unless asked (its emulation of
    // the bf16 tensor-core kernels takes about twice as long).
    if gpu || std::env::args().any(|a| a == "--bf16") {
        Ok(ok & demo_and_throughput::<bf16>(&dev, gpu)?)
    } else {
        Ok(ok & demo_and_throughput::<f32>(&dev, gpu)?)
    }
}

fn demo_and_throughput<T: CandleElement>(dev: &Device, gpu: bool) -> Res<bool> {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/learn_while_serving");
    std::fs::create_dir_all(&out)?;
    let ok = Demo::<T>::new(dev, &out)?.run()?;
    throughput::<T>(dev, gpu)?;
    Ok(ok)
}

fn pick_device() -> (Device, bool) {
    #[cfg(feature = "candle-cuda")]
    if lora_kernels::kernels_built()
        && let Ok(dev) = Device::new_cuda(0)
    {
        return (dev, true);
    }
    (Device::Cpu, false)
}

/// The stream of users, the model, and what is measured along the way.
struct Demo<T> {
    model: Model<T>,
    users: Vec<Stream>,
    learners: Vec<Learner>,
    /// The frozen user's slot (served, never trained).
    frozen_slot: usize,
    events: Vec<(usize, usize, Event)>,
    out: PathBuf,
    probe: Probe,
    /// Per slot, whether the optimizers step it (as last set).
    stepping: Vec<bool>,
    /// Seconds and tokens of serving and of learning, summed over steps.
    serve_s: f64,
    learn_s: f64,
    served_tokens: usize,
    learn_steps: usize,
}

impl<T: CandleElement> Demo<T> {
    fn new(dev: &Device, out: &Path) -> Res<Self> {
        let model = Model::<T>::new(DEMO, dev, 2026)?;
        let (third, half) = (STEPS / 3, STEPS / 2);
        let v = DEMO.vocab;
        let users = vec![
            Stream::new("ana", 4, vec![0, half], v, 1),
            Stream::new("ben", 2, vec![0, half], v, 2),
            Stream::new("cai", 4, vec![0], v, 3),
            Stream::new("dee", 1, vec![third], v, 4),
        ];
        let events = vec![
            (0, 0, Event::Join),
            (0, 1, Event::Join),
            (0, 2, Event::Join),
            (third, 2, Event::Leave),
            (third, 3, Event::Join),
            (half, 0, Event::NextTask),
            (half, 1, Event::NextTask),
            (2 * third, 3, Event::Leave),
            (2 * third, 2, Event::Rejoin),
        ];
        let learners = (0..users.len())
            .flat_map(|user| {
                [false, true].map(|anchor| Learner {
                    user,
                    anchor,
                    slot: None,
                    saved: None,
                    curves: users[user].tasks.iter().map(|_| Vec::new()).collect(),
                })
            })
            .collect();
        let mut demo = Demo {
            model,
            users,
            learners,
            frozen_slot: DEMO.slots - 1,
            events,
            out: out.to_path_buf(),
            probe: Probe::default(),
            stepping: vec![true; DEMO.slots],
            serve_s: 0.0,
            learn_s: 0.0,
            served_tokens: 0,
            learn_steps: 0,
        };
        demo.load_frozen_user()?;
        Ok(demo)
    }

    /// eve: an adapter someone trained elsewhere, read from a PEFT directory
    /// and only served.
    fn load_frozen_user(&mut self) -> Res<()> {
        let adapter = random_adapter(&DEMO, 4, 99, (0.3, 0.3))?;
        let dir = self.out.join("adapters/eve");
        adapter.write_dir(&dir, DType::BF16)?;
        self.model
            .adapters
            .load_dir(self.frozen_slot, &dir, LoadOptions::default())?;
        println!("eve: a served-only adapter read from {}", dir.display());
        // What scripts/llama-check.py compares with transformers + PEFT.
        self.model.export_hf(&self.out)?;
        Probe::save(
            &self.model,
            self.frozen_slot,
            &self.out.join("probe.safetensors"),
        )?;
        Ok(())
    }

    fn run(mut self) -> Res<bool> {
        println!(
            "\nmodel: {} layers, hidden {}, {} heads ({} kv), intermediate {}, vocab {}; LoRA on {} \
             projections per layer in {} slots; users: {}, each as two learners (plain, +anchor \
             pull {ANCHOR_PULL}); eve only served; {STEPS} steps; {:?}",
            DEMO.layers,
            DEMO.hidden,
            DEMO.heads,
            DEMO.kv_heads,
            DEMO.intermediate,
            DEMO.vocab,
            PROJECTIONS.len(),
            DEMO.slots,
            (self.users.iter())
                .map(|u| format!("{} (rank {})", u.name, u.rank))
                .collect::<Vec<_>>()
                .join(", "),
            <T as Element>::DTYPE
        );
        for step in 0..STEPS {
            let events: Vec<_> = (self.events.iter())
                .filter(|e| e.0 == step)
                .map(|&(_, u, e)| (u, e))
                .collect();
            for &(user, event) in &events {
                self.apply(step, user, event)?;
            }
            if step % EVAL_EVERY == 0 || !events.is_empty() {
                self.evaluate(step)?;
            }
            self.serve_and_learn(step)?;
        }
        self.evaluate(STEPS)?;
        let ok = self.report()?;
        Ok(ok)
    }

    /// One step: every user's traffic served in one batch (with eve's and
    /// base-only sequences), then the learners whose feedback arrived train
    /// on what they were served.
    fn serve_and_learn(&mut self, step: usize) -> Res<()> {
        let mut rng = StdRng::seed_from_u64(step as u64);
        let mut serve = BatchBuilder::new(SEQ);
        let mut train = BatchBuilder::new(SEQ);
        let mut trained = Vec::new();
        for l in &self.learners {
            let Some(slot) = l.slot else { continue };
            let (tokens, targets, feedback) =
                self.users[l.user].traffic(step, SERVE_SEQS, SEQ, FEEDBACK);
            serve.push(&tokens, &targets, slot as i32);
            if feedback {
                train.push(&tokens, &targets, slot as i32);
                trained.push(slot);
            }
        }
        let random_tokens = |rng: &mut StdRng, n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| rng.random_range(0..DEMO.vocab as u32))
                .collect()
        };
        let eve = random_tokens(&mut rng, SERVE_SEQS * SEQ);
        serve.push(&eve, &eve, self.frozen_slot as i32);
        let base = random_tokens(&mut rng, BASE_SEQS * SEQ);
        serve.push(&base, &base, -1);

        let start = Instant::now();
        let logits = self.model.forward(&serve.batch)?;
        sync(&logits)?;
        self.serve_s += start.elapsed().as_secs_f64();
        self.served_tokens += serve.batch.tokens.len();
        if trained.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        // Only the slots whose feedback arrived step (an idle slot would
        // still move with its moments); a slot's flag is written when it
        // changes.
        for slot in (0..DEMO.slots).filter(|&s| s != self.frozen_slot) {
            let active = trained.contains(&slot);
            if self.stepping[slot] != active {
                for opt in self.model.optimizers.values_mut() {
                    opt.set_active(slot, active)?;
                }
                self.stepping[slot] = active;
            }
        }
        // Each learner's loss is its own mean over its tokens, so that what
        // one learns does not depend on how many others train with it.
        let weight = 1.0 / (SERVE_SEQS * SEQ) as f32;
        let weights = vec![weight; train.batch.tokens.len()];
        let tape = self.model.forward_train(&train.batch)?;
        self.model.learn(&tape, &train.targets, &weights)?;
        sync(&tape.logits)?;
        self.learn_s += start.elapsed().as_secs_f64();
        self.learn_steps += 1;
        Ok(())
    }

    /// Each learner's held-out loss on each of its tasks so far, in one
    /// batch; then the interference probe.
    fn evaluate(&mut self, step: usize) -> Res<()> {
        let mut eval = BatchBuilder::new(EVAL_SEQ);
        let mut parts = Vec::new();
        for (i, l) in self.learners.iter().enumerate() {
            let Some(slot) = l.slot else { continue };
            let user = &self.users[l.user];
            for task in 0..=user.task_at(step) {
                let (tokens, targets) = &user.eval[task];
                eval.push(tokens, targets, slot as i32);
                parts.push((i, task));
            }
        }
        if !parts.is_empty() {
            let logits = self.model.forward(&eval.batch)?;
            let losses = layers::token_losses(&logits, &eval.targets)?;
            let mut progress = format!("step {step:3}: current-task loss");
            for (chunk, &(i, task)) in losses.chunks(EVAL_SEQS * EVAL_SEQ).zip(&parts) {
                let mean = chunk.iter().sum::<f32>() / chunk.len() as f32;
                let l = &mut self.learners[i];
                l.curves[task].push((step, mean));
                if task == self.users[l.user].task_at(step) {
                    progress += &format!("  {} {mean:.2}", l.name(&self.users));
                }
            }
            println!("{progress}");
        }
        self.probe
            .run(&self.model, &self.learners, self.frozen_slot)
    }
}

/// A batch under construction: sequences of one length, with targets.
struct BatchBuilder {
    batch: Batch,
    targets: Vec<u32>,
}

impl BatchBuilder {
    fn new(seq: usize) -> Self {
        BatchBuilder {
            batch: Batch {
                tokens: Vec::new(),
                ids: Vec::new(),
                seqs: 0,
                seq,
            },
            targets: Vec::new(),
        }
    }

    /// Whole sequences of `tokens` (a multiple of the length) for slot `id`.
    fn push(&mut self, tokens: &[u32], targets: &[u32], id: i32) {
        let b = &mut self.batch;
        b.tokens.extend_from_slice(tokens);
        b.ids.extend(std::iter::repeat_n(id, tokens.len()));
        b.seqs += tokens.len() / b.seq;
        self.targets.extend_from_slice(targets);
    }
}

/// Waits for the tensor's device (timing on a GPU).
fn sync(t: &candle_core::Tensor) -> Res<()> {
    Ok(t.device().synchronize()?)
}

/// An adapter for every projection of `model` at `rank` with scale 2
/// (PEFT's `lora_alpha = 2 r`): `a` uniform in `[-a_bound, a_bound)`, `b`
/// in `[-b_bound, b_bound)` (`b_bound = 0`: PEFT's init, `b = 0`).
fn random_adapter(
    cfg: &Config,
    rank: usize,
    seed: u64,
    (a_bound, b_bound): (f32, f32),
) -> Res<PeftAdapter> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut uniform = |len: usize, bound: f32| -> Vec<f32> {
        if bound == 0.0 {
            return vec![0.0; len];
        }
        (0..len).map(|_| rng.random_range(-bound..bound)).collect()
    };
    let mut modules = std::collections::BTreeMap::new();
    for l in 0..cfg.layers {
        for p in 0..PROJECTIONS.len() {
            let (k, n) = cfg.shape(p);
            let module = ModuleAdapter {
                rank,
                in_features: k,
                out_features: n,
                scale: 2.0,
                a: uniform(rank * k, a_bound),
                b: uniform(n * rank, b_bound),
            };
            modules.insert(Config::path(l, p), module);
        }
    }
    Ok(PeftAdapter::from_modules(modules, false, false)?)
}

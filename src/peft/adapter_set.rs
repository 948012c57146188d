//! [`AdapterSet`]: one [`AdapterPool`] per target projection of a model,
//! keyed by module path, so that one slot id per token serves a whole model
//! and one call loads, evicts or saves a user's adapter everywhere.
use std::collections::BTreeMap;
use std::path::Path;

use super::adapter_file::{ModuleAdapter, PeftAdapter, WEIGHTS_FILE, write_files};
use super::config::{ModuleMatch, peft_error};
use super::optimizer_state::{self, STATE_FILE};
use crate::adapter_pool::{AdapterPool, PoolConfig, StagedMeta, check_storable};
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::ops::adamw::{SlotHyper, SlotOptimizer, SlotState};
use crate::ops::{DeviceAdapter, KernelElement, pool_load};
use crate::shape::invalid;

/// How a module's base weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseLayout {
    /// `[out_features, in_features]`, as `torch.nn.Linear` keeps it and the
    /// kernels read it.
    OutIn,
    /// `[in_features, out_features]`, as GPT-2's `Conv1D` keeps it (PEFT's
    /// `fan_in_fan_out`). `lora_A` and `lora_B` keep their usual shapes; only
    /// the base weight is transposed for the kernels
    /// ([`ModuleSpec::kernel_weight`]).
    InOut,
}

/// A target projection of the model: its features and base-weight layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Output features (the pool's `n`).
    pub out_features: usize,
    /// Input features (the pool's `k`).
    pub in_features: usize,
    /// How its base weight is stored.
    pub base_layout: BaseLayout,
}

impl ModuleSpec {
    /// A `torch.nn.Linear(in_features, out_features)` (weight `[out, in]`).
    pub fn linear(in_features: usize, out_features: usize) -> Self {
        ModuleSpec {
            out_features,
            in_features,
            base_layout: BaseLayout::OutIn,
        }
    }

    /// A GPT-2 `Conv1D(out_features, in_features)` (weight `[in, out]`).
    pub fn conv1d(in_features: usize, out_features: usize) -> Self {
        ModuleSpec {
            base_layout: BaseLayout::InOut,
            ..Self::linear(in_features, out_features)
        }
    }

    /// The base weight `w` as stored (`base_layout`) in the kernels' layout
    /// `[out_features, in_features]`.
    pub fn kernel_weight<T: Copy>(&self, w: &[T]) -> Result<Vec<T>> {
        let (n, k) = (self.out_features, self.in_features);
        crate::shape::check_matrix("w", n, k, w.len())?;
        Ok(match self.base_layout {
            BaseLayout::OutIn => w.to_vec(),
            BaseLayout::InOut => (0..n * k).map(|i| w[(i % k) * n + i / k]).collect(),
        })
    }
}

/// What [`AdapterSet::load`] does with what it can't serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Modules of the adapter that have no pool in the set: an error
    /// (default), or skipped and listed in [`LoadReport::skipped_modules`].
    pub skip_modules_without_pool: bool,
    /// Tensors of `modules_to_save` (whole modules trained beside the
    /// adapter, e.g. a classifier head): refused (default, since serving
    /// without them changes the model's output), or ignored and listed in
    /// [`LoadReport::ignored_tensors`].
    pub ignore_modules_to_save: bool,
}

/// What a load did besides loading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Modules whose adapter went into their pool.
    pub loaded: Vec<String>,
    /// Modules of the adapter without a pool (skipped by option).
    pub skipped_modules: Vec<String>,
    /// `modules_to_save` tensors not served (ignored by option).
    pub ignored_tensors: Vec<String>,
    /// Pools the adapter does not cover: their copy of the slot was emptied,
    /// so no earlier adapter's weights stay mixed in.
    pub emptied: Vec<String>,
    /// Whether the optimizers' state (moments, step counts, anchors) was
    /// restored from the directory ([`AdapterSet::load_dir_for_training`]).
    pub optimizer_state: bool,
    /// Things PEFT would warn about (e.g. `fan_in_fan_out` disagreeing with
    /// a module's base layout, which PEFT corrects per module).
    pub warnings: Vec<String>,
}

/// How a load for training goes in: each module through its optimizer,
/// with its saved state when there is one.
struct Training<'a> {
    hyper: SlotHyper,
    optimizers: &'a mut BTreeMap<String, SlotOptimizer>,
    states: Option<&'a BTreeMap<String, SlotState>>,
}

/// A pool per target projection of a model, all with the same slots.
///
/// Loading an adapter into slot `s` puts each module's weights into slot
/// `s` of that module's pool, so a token with id `s` is served the same
/// adapter in every layer. Every load is all or nothing: everything is
/// checked before any pool changes.
pub struct AdapterSet<T> {
    dev: Device,
    slots: usize,
    modules: BTreeMap<String, (ModuleSpec, AdapterPool<T>)>,
    /// Per slot, whether its adapter uses rsLoRA (what saving writes).
    rslora: Vec<bool>,
}

impl<T: KernelElement> AdapterSet<T> {
    /// A pool of `slots` slots of rank up to `max_rank` for every module.
    pub fn new(
        dev: &Device,
        slots: usize,
        max_rank: usize,
        modules: impl IntoIterator<Item = (String, ModuleSpec)>,
    ) -> Result<Self> {
        let mut set = BTreeMap::new();
        for (path, spec) in modules {
            let cfg = PoolConfig {
                slots,
                max_rank,
                n: spec.out_features,
                k: spec.in_features,
            };
            let pool = AdapterPool::new(dev, cfg)?;
            if set.insert(path.clone(), (spec, pool)).is_some() {
                return Err(invalid("modules", path, "names a module twice"));
            }
        }
        if set.is_empty() {
            return Err(invalid(
                "modules",
                "[]",
                "an adapter set needs at least one module",
            ));
        }
        Ok(AdapterSet {
            dev: dev.clone(),
            slots,
            modules: set,
            rslora: vec![false; slots],
        })
    }

    /// The device every pool lives on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The pool of the module at `path`.
    pub fn pool(&self, path: &str) -> Option<&AdapterPool<T>> {
        self.modules.get(path).map(|(_, pool)| pool)
    }

    /// The pool of the module at `path`, to train it (a `SlotOptimizer`
    /// per pool) or to load a single module.
    pub fn pool_mut(&mut self, path: &str) -> Option<&mut AdapterPool<T>> {
        self.modules.get_mut(path).map(|(_, pool)| pool)
    }

    /// Every module: its path, spec and pool, in path order.
    pub fn modules(&self) -> impl Iterator<Item = (&str, &ModuleSpec, &AdapterPool<T>)> {
        (self.modules.iter()).map(|(path, (spec, pool))| (path.as_str(), spec, pool))
    }

    /// Reads a PEFT directory and loads it into `slot` ([`Self::load`]).
    pub fn load_dir(
        &mut self,
        slot: usize,
        dir: impl AsRef<Path>,
        options: LoadOptions,
    ) -> Result<LoadReport> {
        let adapter = PeftAdapter::read_dir(dir)?;
        self.load(slot, &adapter, options)
    }

    /// Loads `adapter` into `slot` of every pool: each module's weights into
    /// its module's pool, and the slot emptied in the pools the adapter does
    /// not cover. The weights of all modules go to the device in one upload.
    ///
    /// Checked first, with nothing changed on an error: the slot; that every
    /// module has a pool (or is skipped by option) with its features, and a
    /// rank within the pool's `max_rank`; that no module the config targets
    /// lacks its weights; `modules_to_save` (refused unless ignored by
    /// option); every weight finite in the pools' type.
    pub fn load(
        &mut self,
        slot: usize,
        adapter: &PeftAdapter,
        options: LoadOptions,
    ) -> Result<LoadReport> {
        let (plan, report) = self.plan_load(slot, adapter, options)?;
        self.write_planned(slot, &plan)?;
        self.finish_load(slot, adapter, &plan, report)
    }

    /// Loads `adapter` into `slot` for training: as [`Self::load`], but each
    /// module's weights go in through the [`SlotOptimizer`] of its pool
    /// (`optimizers`, keyed by module path), whose f32 masters and anchor
    /// take the file's values exactly (the pool gets them rounded to `T`),
    /// whose moments and step count restart from zero and which trains the
    /// slot with `hyper`. A directory saved from
    /// [`Self::masters`] in f32 so continues from the very weights it was
    /// saved with (AdamW's moments are not part of a PEFT directory).
    ///
    /// All or nothing: besides [`Self::load`]'s checks, every loaded module
    /// must have its optimizer, made for its pool; on an error nothing
    /// changed.
    pub fn load_for_training(
        &mut self,
        slot: usize,
        adapter: &PeftAdapter,
        options: LoadOptions,
        hyper: SlotHyper,
        optimizers: &mut BTreeMap<String, SlotOptimizer>,
    ) -> Result<LoadReport> {
        let training = Training {
            hyper,
            optimizers,
            states: None,
        };
        self.load_training(slot, adapter, options, training)
    }

    /// Reads a directory and loads it for training
    /// ([`Self::load_for_training`]). When [`Self::save_for_training`] wrote
    /// it, its [`STATE_FILE`] restores every module's AdamW moments, step
    /// count and anchor as well, so training continues exactly where it
    /// stopped ([`LoadReport::optimizer_state`] says so); a directory without
    /// one starts them afresh. The state file is checked with the rest
    /// before anything changes.
    pub fn load_dir_for_training(
        &mut self,
        slot: usize,
        dir: impl AsRef<Path>,
        options: LoadOptions,
        hyper: SlotHyper,
        optimizers: &mut BTreeMap<String, SlotOptimizer>,
    ) -> Result<LoadReport> {
        let adapter = PeftAdapter::read_dir(&dir)?;
        let states = optimizer_state::read(dir.as_ref(), &adapter)?;
        let training = Training {
            hyper,
            optimizers,
            states: states.as_ref(),
        };
        self.load_training(slot, &adapter, options, training)
    }

    fn load_training(
        &mut self,
        slot: usize,
        adapter: &PeftAdapter,
        options: LoadOptions,
        training: Training<'_>,
    ) -> Result<LoadReport> {
        let Training {
            hyper,
            optimizers,
            states,
        } = training;
        let (plan, mut report) = self.plan_load(slot, adapter, options)?;
        for (path, m) in &plan {
            let opt = optimizers.get(*path).ok_or_else(|| {
                invalid(
                    "optimizers",
                    path,
                    "no SlotOptimizer for this module's pool",
                )
            })?;
            let pool = &self.modules[*path].1;
            opt.check_load(pool, slot, (&m.a, &m.b), m.rank, m.scale, hyper)?;
            if let Some(state) = states.map(|s| &s[*path]) {
                opt.check_state(state, m.rank)?;
            }
        }
        for (path, m) in &plan {
            let opt = optimizers.get_mut(*path).expect("checked above");
            let pool = &mut self.modules.get_mut(*path).expect("a planned module").1;
            opt.load_adapter(pool, slot, &m.a, &m.b, m.rank, m.scale, hyper)?;
            if let Some(state) = states.map(|s| &s[*path]) {
                opt.set_state(pool, slot, state)?;
            }
        }
        report.optimizer_state = states.is_some();
        self.finish_load(slot, adapter, &plan, report)
    }

    /// The checks of a load, with nothing changed: the modules to write and
    /// the report so far.
    fn plan_load<'a>(
        &self,
        slot: usize,
        adapter: &'a PeftAdapter,
        options: LoadOptions,
    ) -> Result<(Vec<(&'a str, &'a ModuleAdapter)>, LoadReport)> {
        let file = format!("{}/{WEIGHTS_FILE}", adapter.source);
        self.check_slot(slot)?;
        let mut report = LoadReport::default();
        if let Some(key) = adapter.modules_to_save_tensors.first() {
            if !options.ignore_modules_to_save {
                return Err(peft_error(
                    &file,
                    key,
                    "belongs to modules_to_save (a whole module trained with the adapter), which \
                     the kernels don't serve; set LoadOptions::ignore_modules_to_save to serve the \
                     adapter without it",
                ));
            }
            report.ignored_tensors = adapter.modules_to_save_tensors.clone();
        }
        let mut plan = Vec::new();
        for (path, m) in &adapter.modules {
            let key = format!("base_model.model.{path}.lora_A.weight");
            let Some((spec, pool)) = self.modules.get(path) else {
                if options.skip_modules_without_pool {
                    report.skipped_modules.push(path.clone());
                    continue;
                }
                return Err(peft_error(
                    &file,
                    &key,
                    "module has no pool in the adapter set (LoadOptions::skip_modules_without_pool \
                     skips such modules)",
                ));
            };
            check_module(&file, &key, spec, pool, m)?;
            let config_flips = adapter.config.fan_in_fan_out;
            if config_flips != (spec.base_layout == BaseLayout::InOut) {
                report.warnings.push(format!(
                    "{path}: adapter_config.json has fan_in_fan_out = {config_flips} but the \
                     module's base weight is {:?}; the adapter's own weights are the same either way",
                    spec.base_layout
                ));
            }
            plan.push((path.as_str(), m));
        }
        if !matches!(adapter.config.target_modules, ModuleMatch::AllLinear)
            && let Some(path) = self
                .modules
                .keys()
                .find(|p| adapter.config.targets(p) && !adapter.modules.contains_key(*p))
        {
            return Err(peft_error(
                &file,
                &format!("base_model.model.{path}.lora_A.weight"),
                "missing: adapter_config.json's target_modules covers this module",
            ));
        }
        Ok((plan, report))
    }

    /// After a load's writes: the slot emptied where the adapter has
    /// nothing, its rsLoRA flag kept for saving, the report completed.
    fn finish_load(
        &mut self,
        slot: usize,
        adapter: &PeftAdapter,
        plan: &[(&str, &ModuleAdapter)],
        mut report: LoadReport,
    ) -> Result<LoadReport> {
        report.loaded = plan.iter().map(|(p, _)| p.to_string()).collect();
        report.emptied = self.empty_uncovered(slot, |p| adapter.modules.contains_key(p))?;
        self.rslora[slot] = adapter.config.use_rslora;
        Ok(report)
    }

    /// Loads adapters that already lie in device memory (e.g. tensors an
    /// engine read onto the GPU) into `slot`: one [`DeviceAdapter`] per
    /// module path, copied on the device; the slot is emptied in the pools
    /// not named. All or nothing: the paths, sizes and devices are checked,
    /// then one device pass over all modules looks for NaN and Inf (one wait
    /// for its result), and only then is anything written. A later save
    /// writes plain (not rsLoRA) alphas.
    pub fn load_device(
        &mut self,
        slot: usize,
        modules: &[(&str, DeviceAdapter<'_, T>)],
    ) -> Result<LoadReport> {
        self.check_slot(slot)?;
        for (i, (path, m)) in modules.iter().enumerate() {
            let Some((_, pool)) = self.modules.get(*path) else {
                return Err(invalid(
                    "modules",
                    path,
                    "no pool in the adapter set has this path",
                ));
            };
            if modules[..i].iter().any(|(p, _)| p == path) {
                return Err(invalid("modules", path, "named twice"));
            }
            pool.check_device_load(slot, m)?;
        }
        let mut stats = self
            .dev
            .zeros::<u64>(modules.len().max(1) * pool_load::STATS_PER_ADAPTER)?;
        for (i, (path, m)) in modules.iter().enumerate() {
            let n = self.modules[*path].0.out_features;
            let at = i * pool_load::STATS_PER_ADAPTER;
            pool_load::queue_check(&self.dev, &m.a, &m.b, n, m.rank, &mut stats, at)?;
        }
        let stats = self.dev.download(&stats)?;
        for (i, (_, m)) in modules.iter().enumerate() {
            let at = i * pool_load::STATS_PER_ADAPTER;
            if let Some((operand, index)) = pool_load::first_non_finite(&stats[at..]) {
                let src = if operand == "a" { &m.a } else { &m.b };
                let error = pool_load::non_finite_error(&self.dev, operand, src, index)?;
                return Err(invalid("modules", modules[i].0, error.to_string()));
            }
        }
        self.write_all(slot, modules)?;
        let emptied = self.empty_uncovered(slot, |p| modules.iter().any(|(q, _)| *q == p))?;
        self.rslora[slot] = false;
        Ok(LoadReport {
            loaded: modules.iter().map(|(p, _)| p.to_string()).collect(),
            emptied,
            ..LoadReport::default()
        })
    }

    /// One upload of every planned module's weights (`a`, then `b`, as `T`),
    /// then [`Self::write_all`] from that buffer.
    fn write_planned(&mut self, slot: usize, plan: &[(&str, &ModuleAdapter)]) -> Result<()> {
        let to_t = |v: &[f32]| v.iter().map(|&e| T::from_f32(e)).collect::<Vec<T>>();
        let weights: Vec<T> = (plan.iter())
            .flat_map(|(_, m)| [to_t(&m.a), to_t(&m.b)])
            .flatten()
            .collect();
        let weights = self.dev.upload(&weights)?;
        let mut at = 0;
        let mut adapters = Vec::with_capacity(plan.len());
        for (path, m) in plan {
            let (a_end, b_end) = (at + m.a.len(), at + m.a.len() + m.b.len());
            let (a, b) = (weights.view(at..a_end), weights.view(a_end..b_end));
            adapters.push((*path, DeviceAdapter::new(a, b, m.rank, m.scale)));
            at = b_end;
        }
        self.write_all(slot, &adapters)
    }

    /// Writes checked adapters on the device into `slot` of their pools: one
    /// upload of all their scales and one of their ranks, then device work
    /// per pool.
    fn write_all(&mut self, slot: usize, modules: &[(&str, DeviceAdapter<'_, T>)]) -> Result<()> {
        let scales: Vec<f32> = modules.iter().map(|(_, m)| m.scale).collect();
        let ranks: Vec<i32> = modules.iter().map(|(_, m)| m.rank as i32).collect();
        let (scales, ranks) = (self.dev.upload(&scales)?, self.dev.upload(&ranks)?);
        for (at, (path, m)) in modules.iter().enumerate() {
            let meta = StagedMeta {
                scales: &scales,
                ranks: &ranks,
                at,
            };
            let pool = &mut self.modules.get_mut(*path).expect("a checked module").1;
            pool.write_device(slot, m, &meta)?;
        }
        Ok(())
    }

    /// Empties `slot` in the pools whose path `covered` rejects (a load's
    /// adapter has nothing for them), returning their paths.
    fn empty_uncovered(
        &mut self,
        slot: usize,
        covered: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let mut emptied = Vec::new();
        for (path, (_, pool)) in &mut self.modules {
            if !covered(path) {
                pool.evict(slot)?;
                emptied.push(path.clone());
            }
        }
        Ok(emptied)
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.slots {
            return Err(invalid(
                "slot",
                slot,
                format!("the set has {} slots", self.slots),
            ));
        }
        Ok(())
    }

    /// Empties `slot` in every pool.
    pub fn evict(&mut self, slot: usize) -> Result<()> {
        self.check_slot(slot)?;
        for (_, pool) in self.modules.values_mut() {
            pool.evict(slot)?;
        }
        Ok(())
    }

    /// The adapter in `slot`, from the pools (in their storage type), with a
    /// config PEFT reads back as the same ranks and scales; None when no pool
    /// holds anything in the slot.
    pub fn adapter(&self, slot: usize) -> Result<Option<PeftAdapter>> {
        self.gather(slot, |_, pool| {
            Ok(pool.adapter(slot)?.map(|s| {
                let f32s = |v: Vec<T>| v.into_iter().map(|e| e.to_f32()).collect();
                (f32s(s.a), f32s(s.b), s.scale)
            }))
        })
    }

    /// The adapter in `slot` from the optimizers' f32 master weights:
    /// `optimizer(path)` gives the `SlotOptimizer` of each module's pool
    /// (an error names a module that has none).
    pub fn masters<'o>(
        &self,
        slot: usize,
        optimizer: impl Fn(&str) -> Option<&'o SlotOptimizer>,
    ) -> Result<Option<PeftAdapter>> {
        self.gather(slot, |path, pool| {
            if pool.rank(slot).is_none() {
                return Ok(None);
            }
            let opt = optimizer(path).ok_or_else(|| {
                invalid("optimizer", path, "no SlotOptimizer for this module's pool")
            })?;
            let (a, b) = opt.master(pool, slot)?;
            let scale = pool.slot_scale(slot)?;
            Ok(Some((a, b, scale)))
        })
    }

    /// Saves `slot` to resume training later: the optimizers' f32 master
    /// weights as a PEFT directory ([`Self::masters`]; PEFT loads it) and,
    /// beside them, their moments, step counts and anchors
    /// ([`STATE_FILE`]), which [`Self::load_dir_for_training`] restores.
    pub fn save_for_training(
        &self,
        slot: usize,
        dir: impl AsRef<Path>,
        optimizers: &BTreeMap<String, SlotOptimizer>,
    ) -> Result<()> {
        let adapter = self
            .masters(slot, |path| optimizers.get(path))?
            .ok_or_else(|| invalid("slot", slot, "holds no adapter in any pool of the set"))?;
        let mut states = BTreeMap::new();
        for path in adapter.modules.keys() {
            let pool = &self.modules[path].1;
            states.insert(path.clone(), optimizers[path].state(pool, slot)?);
        }
        let state_bytes = optimizer_state::to_bytes(&adapter, &states)?;
        adapter.write_dir(&dir, DType::F32)?;
        write_files(dir.as_ref(), [(STATE_FILE, state_bytes)])
    }

    /// Saves the adapter in `slot` (from the pools) as a PEFT directory,
    /// weights in the pools' type. An error if the slot is empty.
    pub fn save(&self, slot: usize, dir: impl AsRef<Path>) -> Result<()> {
        let adapter = self
            .adapter(slot)?
            .ok_or_else(|| invalid("slot", slot, "holds no adapter in any pool of the set"))?;
        adapter.write_dir(dir, T::DTYPE)
    }

    fn gather(
        &self,
        slot: usize,
        weights: impl Fn(&str, &AdapterPool<T>) -> Result<Option<(Vec<f32>, Vec<f32>, f32)>>,
    ) -> Result<Option<PeftAdapter>> {
        self.check_slot(slot)?;
        let mut modules = BTreeMap::new();
        let mut fan_in_fan_out = false;
        for (path, (spec, pool)) in &self.modules {
            let (Some(rank), Some((a, b, scale))) = (pool.rank(slot), weights(path, pool)?) else {
                continue;
            };
            fan_in_fan_out |= spec.base_layout == BaseLayout::InOut;
            let module = ModuleAdapter {
                rank,
                in_features: spec.in_features,
                out_features: spec.out_features,
                scale,
                a,
                b,
            };
            modules.insert(path.clone(), module);
        }
        if modules.is_empty() {
            return Ok(None);
        }
        PeftAdapter::from_modules(modules, self.rslora[slot], fan_in_fan_out).map(Some)
    }
}

/// Checks a module's adapter against its pool (features, rank, values in
/// the pool's type), naming the file and key.
fn check_module<T: KernelElement>(
    file: &str,
    key: &str,
    spec: &ModuleSpec,
    pool: &AdapterPool<T>,
    m: &ModuleAdapter,
) -> Result<()> {
    if (m.out_features, m.in_features) != (spec.out_features, spec.in_features) {
        return Err(peft_error(
            file,
            key,
            &format!(
                "adapts {} inputs -> {} outputs but the set's module has {} -> {}",
                m.in_features, m.out_features, spec.in_features, spec.out_features
            ),
        ));
    }
    let sizes = crate::shape::check_rank("rank", m.rank)
        .and_then(|_| crate::shape::check_matrix("lora_A", m.rank, m.in_features, m.a.len()))
        .and_then(|_| crate::shape::check_matrix("lora_B", m.out_features, m.rank, m.b.len()));
    sizes.map_err(|e| peft_error(file, key, &e.to_string()))?;
    let max_rank = pool.config().max_rank;
    if m.rank > max_rank {
        return Err(peft_error(
            file,
            key,
            &format!("has rank {} above the set's max_rank {max_rank}", m.rank),
        ));
    }
    for (half, values) in [("lora_A", &m.a), ("lora_B", &m.b)] {
        check_storable::<T>("weight", values)
            .map_err(|e| peft_error(file, &key.replace("lora_A", half), &e.to_string()))?;
    }
    if !m.scale.is_finite() {
        return Err(peft_error(
            file,
            key,
            &format!("scale {} is not finite", m.scale),
        ));
    }
    Ok(())
}

impl<T> std::fmt::Debug for AdapterSet<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterSet")
            .field("device", &self.dev.name())
            .field("slots", &self.slots)
            .field("modules", &self.modules.keys().collect::<Vec<_>>())
            .finish()
    }
}

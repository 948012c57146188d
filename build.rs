//! Compiles every `kernels/*.cu`:
//! - with nvcc (from `$NVCC`, `$CUDA_HOME/bin`, `PATH`, then the repo's
//!   `.toolchain/cuda` that scripts/install-cuda-toolchain fills), to PTX (compute_80, loads on sm_80 and newer) and to cubins for
//!   each target in `LORA_KERNELS_CUDA_ARCHS` (default `80,90`), embedded from
//!   OUT_DIR into `$OUT_DIR/kernel_images.rs`. A file whose first line is
//!   `// lk-targets: sm_90a` (Hopper's own instructions) becomes one sm_90a
//!   cubin, when the targets include 90, and no PTX. The sm_80 cubin is
//!   ptxas on the compute_80 PTX (nvcc's own second half for -arch=sm_80,
//!   byte for byte), so the C++ front end runs once per target family;
//! - with the `host` feature, also with the host C++ compiler against
//!   `kernels/host` (the host runtime, docs/DESIGN.md section 6).
//!
//! Environment: `NVCC`, `CUDA_HOME`; `LORA_KERNELS_REQUIRE_NVCC=1` makes a missing nvcc an error;
//! `LORA_KERNELS_PTXAS_VERBOSE=1` prints ptxas's register/spill report as
//! cargo warnings; `LORA_KERNELS_LINEINFO=1` adds source line info (for ncu);
//! `LORA_KERNELS_EMBED_PTX=0` leaves the PTX out (cubins only: smaller
//! binaries for a known GPU, as scripts/gpu-check builds them);
//! `LORA_KERNELS_BUILD_CACHE=DIR` keeps the compiled kernels (one file per
//! output and target) and the host runtime's library in DIR, keyed by the
//! kernel sources, the compiler and the options, so another build of the same
//! kernels (other features, profile or targets, the packaged crate) skips nvcc
//! and the host compiler.
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    // Rerun only when the kernels, the chosen nvcc or these variables change
    // (not on every change of PATH: that would recompile the host kernels on
    // every build in some shells).
    for var in [
        "NVCC",
        "CUDA_HOME",
        "LORA_KERNELS_REQUIRE_NVCC",
        "LORA_KERNELS_PTXAS_VERBOSE",
        "LORA_KERNELS_CUDA_ARCHS",
        "LORA_KERNELS_LINEINFO",
        "LORA_KERNELS_EMBED_PTX",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    let kernel_dir = Path::new("kernels");
    let mut sources = list_files(kernel_dir, "cu");
    sources.sort();
    for dir in [
        kernel_dir,
        &kernel_dir.join("include"),
        &kernel_dir.join("host"),
    ] {
        println!("cargo:rerun-if-changed={}", dir.display());
        for file in list_files(dir, "") {
            println!("cargo:rerun-if-changed={}", file.display());
        }
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());

    let images = match find_nvcc() {
        Some(nvcc) => {
            // A reinstalled or upgraded nvcc rebuilds the kernels.
            println!("cargo:rerun-if-changed={}", nvcc.display());
            Some(compile_device(&nvcc, &sources, &out_dir))
        }
        None => {
            if env::var("LORA_KERNELS_REQUIRE_NVCC").as_deref() == Ok("1") {
                panic!(
                    "LORA_KERNELS_REQUIRE_NVCC=1 but nvcc was not found in $NVCC, $CUDA_HOME/bin or PATH \
                     (set NVCC to its path; in the repository, scripts/install-cuda-toolchain installs one)"
                );
            }
            // Cargo shows this only for a path dependency or the crate itself;
            // GPU launches return Error::KernelsNotBuilt, whose message says
            // how to fix the build.
            println!(
                "cargo:warning=nvcc not found ($NVCC, $CUDA_HOME/bin, PATH): building without CUDA kernels \
                 (the host runtime still works). Set NVCC=/path/to/nvcc or CUDA_HOME and rebuild."
            );
            None
        }
    };
    write_image_table(&out_dir, images.as_deref());

    if env::var_os("CARGO_FEATURE_HOST").is_some() {
        compile_host(&sources, &out_dir);
    }
}

fn list_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && (ext.is_empty() || p.extension().is_some_and(|e| e == ext)))
        .collect()
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin").join("nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    let on_path = env::var_os("PATH").and_then(|path| {
        env::split_paths(&path)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    });
    // Last: the toolchain scripts/install-cuda-toolchain puts in the repo.
    on_path.or_else(|| {
        let local = Path::new(".toolchain/cuda/nvidia/cu13/bin/nvcc");
        local.is_file().then(|| local.canonicalize().unwrap())
    })
}

fn cuda_archs() -> Vec<String> {
    env::var("LORA_KERNELS_CUDA_ARCHS")
        .unwrap_or_else(|_| "80,90".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// One kernel file's compiled forms: (stem, ptx path unless Hopper-only, [(sm, cubin path)]).
type Image = (String, Option<PathBuf>, Vec<(u32, PathBuf)>);

/// Whether a kernel file uses Hopper's own instructions (wgmma, TMA): its
/// first line says `// lk-targets: sm_90a`.
fn hopper_only(src: &Path) -> bool {
    fs::read_to_string(src)
        .map(|text| text.lines().next() == Some("// lk-targets: sm_90a"))
        .unwrap_or(false)
}

/// The targets a kernel file compiles for: the chosen ones, or for a
/// Hopper-only file sm_90a if they include compute capability 9.0.
fn file_archs(src: &Path, archs: &[String]) -> Vec<String> {
    if !hopper_only(src) {
        return archs.to_vec();
    }
    if archs.iter().any(|a| arch_sm(a) == 90) {
        vec!["90a".into()]
    } else {
        Vec::new()
    }
}

/// The build cache's entry for the device kernels, when
/// `LORA_KERNELS_BUILD_CACHE` names a cache (a verbose build always
/// compiles: it prints ptxas's report). Its key is everything nvcc's output
/// depends on but the targets (the kernel sources, nvcc itself, the
/// options): each output is its own file in the entry, named by its target,
/// so a build for sm_90 alone reuses the sm_90 cubins of a build for 80,90.
fn device_cache_entry(nvcc: &Path) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    let verbose = env::var("LORA_KERNELS_PTXAS_VERBOSE").as_deref() == Ok("1");
    let cache = env::var_os("LORA_KERNELS_BUILD_CACHE").filter(|_| !verbose)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    "lora-kernels device v3".hash(&mut h);
    nvcc.hash(&mut h);
    tool_version(nvcc).hash(&mut h);
    env::var("LORA_KERNELS_LINEINFO").ok().hash(&mut h);
    hash_kernel_tree(&mut h);
    Some(Path::new(&cache).join(format!("kernels-{:016x}", h.finish())))
}

/// What `TOOL --version` prints (empty when it can't run): an upgraded
/// compiler at the same path makes a new cache key.
fn tool_version(tool: &Path) -> Vec<u8> {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default()
}

/// Hashes the kernel files and every header they may include (the host
/// runtime's too: the same tree), names and contents.
fn hash_kernel_tree(h: &mut impl std::hash::Hasher) {
    use std::hash::Hash;
    let kernels = Path::new("kernels");
    let mut files = list_files(kernels, "cu");
    files.extend(list_files(&kernels.join("include"), ""));
    files.extend(list_files(&kernels.join("host"), ""));
    files.sort();
    for file in files {
        file.hash(h);
        fs::read(&file).unwrap_or_default().hash(h);
    }
}

/// A cache hit: `file` copied from the entry `entry` (by file name) to its
/// place; false when the entry lacks it.
fn restore_from_cache(entry: &Path, file: &Path) -> bool {
    fs::copy(entry.join(file.file_name().unwrap()), file).is_ok()
}

/// Stores `file` in the entry `entry` (best effort): written beside its
/// final name and renamed into place, so a build never reads half a file.
fn store_in_cache(entry: &Path, file: &Path) {
    let name = file.file_name().unwrap();
    let tmp = entry.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let stored = fs::create_dir_all(entry).is_ok()
        && fs::copy(file, &tmp).is_ok()
        && fs::rename(&tmp, entry.join(name)).is_ok();
    if !stored {
        let _ = fs::remove_file(&tmp);
    }
}

/// Where compile_file writes a source's compiled forms in `out_dir`.
fn image_paths(src: &Path, out_dir: &Path, archs: &[String]) -> Image {
    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
    let ptx = (!hopper_only(src)).then(|| out_dir.join(format!("{stem}.ptx")));
    let cubins = file_archs(src, archs)
        .iter()
        .map(|arch| {
            (
                arch_sm(arch),
                out_dir.join(format!("{stem}.sm_{arch}.cubin")),
            )
        })
        .collect();
    (stem, ptx, cubins)
}

// "90a" enables Hopper-only instructions; it is still compute capability 9.0.
fn arch_sm(arch: &str) -> u32 {
    arch.trim_end_matches('a').parse().unwrap_or_else(|_| {
        panic!("LORA_KERNELS_CUDA_ARCHS: `{arch}` is not a number like 80, 90 or 90a")
    })
}

fn compile_device(nvcc: &Path, sources: &[PathBuf], out_dir: &Path) -> Vec<Image> {
    let verbose = env::var("LORA_KERNELS_PTXAS_VERBOSE").as_deref() == Ok("1");
    let archs = cuda_archs();
    let cache = device_cache_entry(nvcc);
    // One thread per kernel file: nvcc is single-threaded and the files are independent.
    std::thread::scope(|scope| {
        let jobs: Vec<_> = sources
            .iter()
            .map(|src| {
                let (archs, cache) = (&archs, cache.as_deref());
                scope.spawn(move || compile_file(nvcc, src, out_dir, archs, verbose, cache))
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("nvcc thread panicked"))
            .collect()
    })
}

/// One kernel file's PTX and cubins, each from the cache entry `cache` when
/// it holds it, else compiled (and stored there).
fn compile_file(
    nvcc: &Path,
    src: &Path,
    out_dir: &Path,
    archs: &[String],
    verbose: bool,
    cache: Option<&Path>,
) -> Image {
    let image = image_paths(src, out_dir, archs);
    let build = |out: &Path, compile: &dyn Fn()| {
        if cache.is_some_and(|entry| restore_from_cache(entry, out)) {
            return;
        }
        compile();
        if let Some(entry) = cache {
            store_in_cache(entry, out);
        }
    };
    if let Some(ptx) = &image.1 {
        build(ptx, &|| {
            run_nvcc(nvcc, src, &["-ptx", "-arch=compute_80"], ptx, false)
        });
    }
    for (arch, (_, cubin)) in file_archs(src, archs).iter().zip(&image.2) {
        build(cubin, &|| match &image.1 {
            // sm_80's cubin is ptxas on the compute_80 PTX above, which is
            // what nvcc does for -arch=sm_80 after its front end (the same
            // bytes), without running the C++ front end a second time.
            Some(ptx) if arch == "80" => {
                run_nvcc(nvcc, ptx, &["-cubin", "-arch=sm_80"], cubin, verbose)
            }
            _ => {
                let target = format!("-arch=sm_{arch}");
                run_nvcc(nvcc, src, &["-cubin", &target], cubin, verbose)
            }
        });
    }
    image
}

/// nvcc with `mode` (what to make) on `src`: a kernel file, compiled as
/// C++17 against kernels/include, or PTX, which goes to ptxas alone.
fn run_nvcc(nvcc: &Path, src: &Path, mode: &[&str], out: &Path, verbose: bool) {
    let mut cmd = Command::new(nvcc);
    cmd.args(mode).arg("-O3");
    if src.extension().is_some_and(|e| e == "cu") {
        cmd.args(["-std=c++17", "-Ikernels/include"]);
    }
    cmd.arg(src).arg("-o").arg(out);
    if verbose {
        cmd.arg("-Xptxas=-v");
    }
    // Source line info for ncu / compute-sanitizer reports (it triples the cubins).
    if env::var("LORA_KERNELS_LINEINFO").as_deref() == Ok("1") {
        cmd.arg("-lineinfo");
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!("nvcc failed on {}:\n{stderr}", src.display());
    }
    if verbose {
        for line in stderr
            .lines()
            .filter(|l| l.contains("Compiling") || l.contains("Used") || l.contains("spill"))
        {
            println!("cargo:warning=ptxas {}: {}", src.display(), line.trim());
        }
    }
}

fn write_image_table(out_dir: &Path, images: Option<&[Image]>) {
    let embed_ptx = env::var("LORA_KERNELS_EMBED_PTX").as_deref() != Ok("0");
    let mut rs = String::from("// Generated by build.rs: the compiled kernel files.\n");
    let _ = writeln!(rs, "pub const KERNELS_BUILT: bool = {};", images.is_some());
    rs.push_str("pub static KERNEL_IMAGES: &[KernelImage] = &[\n");
    for (stem, ptx, cubins) in images.unwrap_or_default() {
        let ptx = match ptx {
            Some(ptx) if embed_ptx => {
                format!("Some(include_str!({:?}))", ptx.display().to_string())
            }
            _ => "None".into(),
        };
        let _ = writeln!(
            rs,
            "    KernelImage {{ file: {stem:?}, ptx: {ptx}, cubins: &["
        );
        for (sm, path) in cubins {
            let _ = writeln!(
                rs,
                "        ({sm}, include_bytes!({:?})),",
                path.display().to_string()
            );
        }
        rs.push_str("    ] },\n");
    }
    rs.push_str("];\n");
    fs::write(out_dir.join("kernel_images.rs"), rs).unwrap();
}

/// The host runtime's static library, through the build cache when
/// `LORA_KERNELS_BUILD_CACHE` names one. Its flags don't depend on the
/// profile's optimization level (always -O2), so the builds of one CI run
/// (check, test, other features, the packaged crate) share one compile.
fn compile_host(sources: &[PathBuf], out_dir: &Path) {
    const LIB: &str = "lora_kernels_host";
    let build = host_build(sources);
    let Some(cache) = env::var_os("LORA_KERNELS_BUILD_CACHE") else {
        build.compile(LIB);
        return;
    };
    let entry = Path::new(&cache).join(format!("host-{:016x}", host_key(&build)));
    let archive = out_dir.join(format!("lib{LIB}.a"));
    if restore_from_cache(&entry, &archive) {
        // What `compile` prints after archiving: link it and the C++ library.
        cc::emit_link_directives(&build, &archive);
        return;
    }
    build.compile(LIB);
    store_in_cache(&entry, &archive);
}

/// The build cache's key for the host runtime: the compiler (path, version
/// and every argument cc gives it: target, debug info, flags from the
/// environment), the target and the sources.
fn host_key(build: &cc::Build) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    "lora-kernels host v1".hash(&mut h);
    let compiler = build.get_compiler();
    compiler.path().hash(&mut h);
    tool_version(compiler.path()).hash(&mut h);
    compiler.args().hash(&mut h);
    env::var("TARGET").ok().hash(&mut h);
    hash_kernel_tree(&mut h);
    h.finish()
}

fn host_build(sources: &[PathBuf]) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .define("LK_HOST", "1")
        .include("kernels/include")
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        // The .cu sources are plain C++ to the host compiler.
        .flag("-x")
        .flag("c++")
        .file("kernels/host/lk_host_runtime.cpp")
        .file("kernels/host/lk_host_hopper.cpp")
        .file("kernels/host/lk_params_layout.cpp")
        .files(sources);
    build
}

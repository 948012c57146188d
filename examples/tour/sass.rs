//! The tour's static section: what each kernel's machine code costs, read by
//! `scripts/sass-check` (docs/DESIGN.md section 16), which writes
//! `target/sass-check/counts.json`. These counts need no GPU: they say how
//! much each main-loop iteration issues per 16 bytes it loads and how much
//! shared-memory traffic feeds each MMA, so the table is not empty on a CPU.
use serde_json::Value;

/// One kernel per row: the bf16 (16-byte copy) variant of each operation.
const KERNELS: [&str; 18] = [
    "lk_fused_forward_decode_bf16_aligned",
    "lk_fused_forward_decode_wide_bf16_aligned",
    "lk_fused_forward_prefill_bf16_aligned",
    "lk_fused_forward_wgmma_bf16",
    "lk_multi_adapter_decode_bf16_aligned",
    "lk_multi_adapter_prefill_bf16_aligned",
    "lk_multi_adapter_wgmma_bf16",
    "lk_backward_u_mma_bf16_aligned",
    "lk_backward_dx_decode_deep_bf16_aligned",
    "lk_backward_dx_decode_wide_bf16_aligned",
    "lk_backward_dx_prefill_bf16_aligned",
    "lk_backward_dx_wgmma_bf16",
    "lk_backward_db_mma_bf16_aligned",
    "lk_backward_da_mma_bf16_aligned",
    "lk_adamw_bf16",
    "lk_merge_bf16",
    "lk_fused_forward_simt_f32",
    "lk_multi_adapter_simt_f32",
];

pub fn section(number: usize) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/sass-check/counts.json");
    println!("\n{number}. machine code (sm_90 SASS, static counts: no GPU needed)");
    let counts = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok());
    let Some(kernels) = counts.as_ref().and_then(|c| c.get("kernels")) else {
        println!(
            "   not read yet: `scripts/sass-check` compiles the kernels for sm_90, counts their SASS and writes {path}"
        );
        return;
    };
    println!(
        "   per tagged loop: instructions per 16 bytes loaded (all / besides MMA, ldmatrix and the loads), \
         ldmatrix bytes per MMA, FMAs per load"
    );
    println!("   {:<40} {:>4} {:>5}  loops", "kernel", "regs", "local");
    for name in KERNELS {
        let Some(k) = kernels.get(name) else {
            println!("   {name:<40} (not in {path}: rerun scripts/sass-check)");
            continue;
        };
        let loops = k["loops"].as_object().map_or(String::new(), |loops| {
            loops
                .iter()
                .map(|(loop_name, c)| {
                    let mut parts = Vec::new();
                    if !c["instr_per_16B"].is_null() {
                        parts.push(format!(
                            "{} / {} per 16 B",
                            show(&c["instr_per_16B"]),
                            show(&c["overhead_per_16B"])
                        ));
                    }
                    // Hopper's wgmma loops: their operands arrive by TMA (no
                    // loads of their own) and feed the tensor cores straight
                    // from shared memory.
                    if c["hgmma"].as_u64().unwrap_or(0) > 0 {
                        parts.push(format!(
                            "{} instructions, {} wgmma",
                            show(&c["instrs"]),
                            show(&c["hgmma"])
                        ));
                    }
                    if c["mma"].as_u64().unwrap_or(0) > 0 {
                        parts.push(format!("{} B/mma", show(&c["ldsm_bytes_per_mma"])));
                    } else if !c["fma_per_load"].is_null() {
                        parts.push(format!("{} fma/load", show(&c["fma_per_load"])));
                    }
                    format!("{loop_name}: {}", parts.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; ")
        });
        println!(
            "   {name:<40} {:>4} {:>5}  {loops}",
            show(&k["regs"]),
            show(&k["local"])
        );
    }
    println!("   budgets (CI fails past them): kernels/sass-budgets");
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

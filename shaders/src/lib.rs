//! The WGSL compute kernels of the engine, as templates named by [`Kernel`] and rendered for
//! one [`Variant`] by [`render`].
//!
//! Each kernel family lives in its own `.wgsl` file under `src/wgsl/`. A template holds only
//! explicit `{{NAME}}` placeholders: `{{WG}}` (workgroup size), `{{WEIGHTS}}` (the weight-format
//! decoder, itself one of the `weights_*.wgsl` files), `{{ACC}}` (per-invocation accumulators of
//! attention), `{{HD}}`, `{{GROUP}}` and `{{SPLITS}}` (head size, query heads per KV head and
//! position splits of the row-per-thread attention), `{{X_DECL}}` (the x binding of matvec and
//! matmul: storage or uniform) and `{{ROPE_HALF}}` (RoPE pair layout). Nothing else is
//! generated, so what runs is what the files say. [`Variant::key`] names a rendered shader for
//! pipeline caching.
//!
//! The kernels use no optional WGSL features (no `f16`, no subgroups): headless Chrome's
//! SwiftShader adapter lacks `shader-f16`, and naga 30 rejects `enable subgroups;`. Weights are
//! therefore bound as `array<vec4<u32>>` and decoded with integer operations (halves too: wgpu
//! refuses `unpack2x16float` on Mesa drivers without shader-f16).
//!
//! # Weight layouts on the GPU
//! A weight matrix (rows = outputs, cols = inputs, y = W·x) is stored as one or more row-range
//! *parts*, each bound on its own so no binding exceeds the device's storage-binding limit.
//! Within a part, values run row by row in *units* ([`WeightFormat::unit`] values each):
//! - `F32`: the f32 bits; `F16`/`BF16`: two halves per u32, low half first.
//! - `Q8_0`, `Q4_0`: structure of arrays. First the f16 scales of all blocks, two per u32 (even
//!   block in the low half), zero-padded to 16 bytes; then the quant bytes of all blocks
//!   (32 i8 = 8 u32 for Q8_0, the 16 GGML nibble bytes = 4 u32 for Q4_0). The 34- and 18-byte
//!   GGML blocks are not 4-byte aligned; this layout is, with no per-block overhead.
//! - `Q4_1`: first one u32 per block holding f16 `d` (low) and f16 `m` (high), padded to
//!   16 bytes; then 4 u32 of nibble bytes per block.
//!
//! The vec4 index where the quant bytes start is passed to the kernels as `q_offset`. The CPU
//! repacking lives in the `mdi-gpu` crate.

/// A kernel family: one WGSL template file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Embedding gather: rows of a weight table -> f32.
    Embed,
    /// RMSNorm over several rows.
    RmsNorm,
    /// Matrix-vector product (decode).
    Matvec,
    /// Matrix-matrix product (prefill), weights decoded once per tile.
    Matmul,
    /// Rotary position embedding, in place.
    Rope,
    /// Appends new K/V rows to a KV cache.
    KvWrite,
    /// Causal grouped-query attention over a KV cache.
    Attention,
    /// The same attention for CPU drivers: one invocation per (token, KV head), no barriers.
    AttentionRpt,
    /// silu(gate) * up.
    Swiglu,
    /// Elementwise sum (residual add).
    Add,
    /// Index of the largest value.
    Argmax,
}

impl Kernel {
    /// Every kernel family.
    pub const ALL: [Kernel; 11] = [
        Kernel::Embed,
        Kernel::RmsNorm,
        Kernel::Matvec,
        Kernel::Matmul,
        Kernel::Rope,
        Kernel::KvWrite,
        Kernel::Attention,
        Kernel::AttentionRpt,
        Kernel::Swiglu,
        Kernel::Add,
        Kernel::Argmax,
    ];

    /// The template text.
    pub fn template(self) -> &'static str {
        match self {
            Kernel::Embed => include_str!("wgsl/embed.wgsl"),
            Kernel::RmsNorm => include_str!("wgsl/rmsnorm.wgsl"),
            Kernel::Matvec => include_str!("wgsl/matvec.wgsl"),
            Kernel::Matmul => include_str!("wgsl/matmul.wgsl"),
            Kernel::Rope => include_str!("wgsl/rope.wgsl"),
            Kernel::KvWrite => include_str!("wgsl/kv_write.wgsl"),
            Kernel::Attention => include_str!("wgsl/attention.wgsl"),
            Kernel::AttentionRpt => include_str!("wgsl/attention_rpt.wgsl"),
            Kernel::Swiglu => include_str!("wgsl/swiglu.wgsl"),
            Kernel::Add => include_str!("wgsl/add.wgsl"),
            Kernel::Argmax => include_str!("wgsl/argmax.wgsl"),
        }
    }

    /// Lower-case name, the first part of every variant key.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Embed => "embed",
            Kernel::RmsNorm => "rmsnorm",
            Kernel::Matvec => "matvec",
            Kernel::Matmul => "matmul",
            Kernel::Rope => "rope",
            Kernel::KvWrite => "kv_write",
            Kernel::Attention => "attention",
            Kernel::AttentionRpt => "attention_rpt",
            Kernel::Swiglu => "swiglu",
            Kernel::Add => "add",
            Kernel::Argmax => "argmax",
        }
    }
}

/// How weights are stored in GPU memory (see the crate docs for the layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl WeightFormat {
    /// Every format.
    pub const ALL: [WeightFormat; 6] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::BF16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
    ];

    /// Values decoded per call of the format's `w_decode`; a row length must be a multiple.
    pub fn unit(self) -> usize {
        match self {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 => 8,
            WeightFormat::Q8_0 | WeightFormat::Q4_0 | WeightFormat::Q4_1 => 32,
        }
    }

    /// Lower-case name as used in keys (`q4_1`).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::BF16 => "bf16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4_1 => "q4_1",
        }
    }

    /// The decoder source spliced in at `{{WEIGHTS}}`: the shared half-precision helper
    /// (`half.wgsl`) followed by the format's own file.
    pub fn decoder(self) -> String {
        let own = match self {
            WeightFormat::F32 => include_str!("wgsl/weights_f32.wgsl"),
            WeightFormat::F16 => include_str!("wgsl/weights_f16.wgsl"),
            WeightFormat::BF16 => include_str!("wgsl/weights_bf16.wgsl"),
            WeightFormat::Q8_0 => include_str!("wgsl/weights_q8_0.wgsl"),
            WeightFormat::Q4_0 => include_str!("wgsl/weights_q4_0.wgsl"),
            WeightFormat::Q4_1 => include_str!("wgsl/weights_q4_1.wgsl"),
        };
        format!("{}\n{own}", include_str!("wgsl/half.wgsl"))
    }
}

/// How rows of a reduction (matvec, RMSNorm) map onto invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// One invocation per row, no barriers: fastest on CPU drivers (lavapipe), where barriers
    /// and workgroup reductions are slow.
    RowPerThread,
    /// One workgroup per row with a reduction in workgroup memory: what real GPUs want.
    /// For matmul: workgroup-cooperative tiles.
    RowPerWorkgroup,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::RowPerThread => "rpt",
            Strategy::RowPerWorkgroup => "rpw",
        }
    }

    fn entry_point(self) -> &'static str {
        match self {
            Strategy::RowPerThread => "row_per_thread",
            Strategy::RowPerWorkgroup => "row_per_workgroup",
        }
    }
}

/// Which elements RoPE rotates together: the model's own setting, one kernel variant each.
pub use mdi_core::RopeLayout;

/// Largest head dimension the attention kernel supports (its accumulators are sized for it).
pub const MAX_HEAD_DIM: u32 = 256;

/// Tile of the matmul kernel: rows and tokens per workgroup (fixed in `matmul.wgsl`).
pub const MATMUL_TILE_ROWS: u32 = 64;
/// Tokens per tiled matmul workgroup.
pub const MATMUL_TILE_TOKENS: u32 = 32;
/// Tokens per invocation of the row-per-thread matmul kernel.
pub const MATMUL_TOKENS_PER_THREAD: u32 = 8;
/// Rows per invocation of the row-per-thread matvec kernel (fixed in `matvec.wgsl`).
pub const MATVEC_ROWS_PER_THREAD: u32 = 4;
/// Rows per invocation of the row-per-thread matmul kernel.
pub const MATMUL_ROWS_PER_THREAD: u32 = 4;

/// Most query heads per KV head of the row-per-thread attention kernel (its per-invocation
/// arrays grow with it).
pub const MAX_ATTENTION_GROUP: u32 = 8;

/// Most values of (query heads per KV head) × head_dim of the row-per-thread attention kernel:
/// each invocation holds two arrays of that many floats, and WGSL caps an invocation's
/// function-scope memory at 8 KiB.
pub const MAX_ATTENTION_GROUP_DIM: u32 = 512;

/// Most position splits of the row-per-thread attention kernel.
pub const MAX_ATTENTION_SPLITS: u32 = 64;

/// Largest uniform x window of matvec, in vec4s: 64 KiB, WebGPU's default uniform binding limit.
pub const MAX_X_WINDOW: u32 = 4096;

/// One compilable instance of a kernel: the family plus everything its placeholders need.
///
/// Workgroup sizes (`wg`) must be powers of two from 1 to 256 (the reductions halve them, and
/// 256 is the browser's invocation limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Embed {
        weights: WeightFormat,
        wg: u32,
    },
    RmsNorm {
        strategy: Strategy,
        wg: u32,
    },
    /// `RowPerThread` computes [`MATVEC_ROWS_PER_THREAD`] rows per invocation. `x_window`: 0
    /// binds x as a storage array; otherwise x is a uniform array of that many vec4s (at most
    /// [`MAX_X_WINDOW`]), which CPU drivers read far faster.
    Matvec {
        weights: WeightFormat,
        strategy: Strategy,
        wg: u32,
        x_window: u32,
    },
    /// `RowPerWorkgroup` selects the tiled kernel, whose workgroups are always 64
    /// invocations (the tile shape is written into the shader) whatever `wg` says.
    /// `x_window` as for [`Variant::Matvec`].
    Matmul {
        weights: WeightFormat,
        strategy: Strategy,
        wg: u32,
        x_window: u32,
    },
    Rope {
        layout: RopeLayout,
        wg: u32,
    },
    KvWrite {
        wg: u32,
    },
    Attention {
        wg: u32,
    },
    /// `head_dim` (a multiple of 4 up to [`MAX_HEAD_DIM`]) and `group` (query heads per KV
    /// head, 1 to [`MAX_ATTENTION_GROUP`]) are compiled in. `splits` 1 is the single-pass
    /// kernel; more splits the positions over that many invocations per (token, KV head) and
    /// takes two passes: the split pass, then `combine`.
    AttentionRpt {
        wg: u32,
        head_dim: u32,
        group: u32,
        splits: u32,
        combine: bool,
    },
    Swiglu {
        wg: u32,
    },
    Add {
        wg: u32,
    },
    Argmax {
        wg: u32,
    },
}

impl Variant {
    /// The template this variant renders.
    pub fn kernel(&self) -> Kernel {
        match self {
            Variant::Embed { .. } => Kernel::Embed,
            Variant::RmsNorm { .. } => Kernel::RmsNorm,
            Variant::Matvec { .. } => Kernel::Matvec,
            Variant::Matmul { .. } => Kernel::Matmul,
            Variant::Rope { .. } => Kernel::Rope,
            Variant::KvWrite { .. } => Kernel::KvWrite,
            Variant::Attention { .. } => Kernel::Attention,
            Variant::AttentionRpt { .. } => Kernel::AttentionRpt,
            Variant::Swiglu { .. } => Kernel::Swiglu,
            Variant::Add { .. } => Kernel::Add,
            Variant::Argmax { .. } => Kernel::Argmax,
        }
    }

    /// Invocations per workgroup.
    pub fn workgroup_size(&self) -> u32 {
        match *self {
            Variant::Matmul {
                strategy: Strategy::RowPerWorkgroup,
                ..
            } => 64,
            Variant::Embed { wg, .. }
            | Variant::Matmul { wg, .. }
            | Variant::RmsNorm { wg, .. }
            | Variant::Matvec { wg, .. }
            | Variant::Rope { wg, .. }
            | Variant::KvWrite { wg }
            | Variant::Attention { wg }
            | Variant::AttentionRpt { wg, .. }
            | Variant::Swiglu { wg }
            | Variant::Add { wg }
            | Variant::Argmax { wg } => wg,
        }
    }

    /// The entry point to build a pipeline from.
    pub fn entry_point(&self) -> &'static str {
        match self {
            Variant::RmsNorm { strategy, .. } | Variant::Matvec { strategy, .. } => {
                strategy.entry_point()
            }
            Variant::AttentionRpt {
                splits, combine, ..
            } => match (splits, combine) {
                (1, _) => "main",
                (_, false) => "split_pass",
                (_, true) => "combine",
            },
            Variant::Matmul { strategy, .. } => match strategy {
                Strategy::RowPerThread => "row_per_thread",
                Strategy::RowPerWorkgroup => "tiled",
            },
            _ => "main",
        }
    }

    /// Whether the parameters can be rendered (`wg` a power of two in 1..=256, uniform x
    /// windows and attention shapes within their limits).
    pub fn is_valid(&self) -> bool {
        let wg = self.workgroup_size();
        let sizes_ok = match *self {
            Variant::Matvec { x_window, .. } | Variant::Matmul { x_window, .. } => {
                x_window <= MAX_X_WINDOW
            }
            Variant::AttentionRpt {
                head_dim,
                group,
                splits,
                ..
            } => {
                head_dim % 4 == 0
                    && (4..=MAX_HEAD_DIM).contains(&head_dim)
                    && (1..=MAX_ATTENTION_GROUP).contains(&group)
                    && group * head_dim <= MAX_ATTENTION_GROUP_DIM
                    && (1..=MAX_ATTENTION_SPLITS).contains(&splits)
            }
            _ => true,
        };
        wg.is_power_of_two() && wg <= 256 && sizes_ok
    }

    /// A descriptive, unique name of the rendered shader and entry point, e.g.
    /// `matvec_q4_1_rpt_wg64`, used to cache pipelines.
    pub fn key(&self) -> String {
        let k = self.kernel().name();
        match *self {
            Variant::Embed { weights, wg } => format!("{k}_{}_wg{wg}", weights.name()),
            Variant::RmsNorm { strategy, wg } => format!("{k}_{}_wg{wg}", strategy.name()),
            Variant::Matvec {
                weights,
                strategy,
                wg,
                x_window,
            } => {
                let s = strategy.name();
                let x = match x_window {
                    0 => String::new(),
                    n => format!("_xu{n}"),
                };
                format!("{k}_{}_{s}{x}_wg{wg}", weights.name())
            }
            Variant::Matmul {
                weights,
                strategy,
                x_window,
                ..
            } => {
                let s = match strategy {
                    Strategy::RowPerThread => "rpt",
                    Strategy::RowPerWorkgroup => "tiled",
                };
                let x = match x_window {
                    0 => String::new(),
                    n => format!("_xu{n}"),
                };
                format!("{k}_{}_{s}{x}_wg{}", weights.name(), self.workgroup_size())
            }
            Variant::AttentionRpt {
                wg,
                head_dim,
                group,
                splits,
                combine,
            } => {
                let pass = match (splits, combine) {
                    (1, _) => String::new(),
                    (n, false) => format!("_split{n}"),
                    (n, true) => format!("_combine{n}"),
                };
                format!("{k}_hd{head_dim}_g{group}{pass}_wg{wg}")
            }
            Variant::Rope { layout, wg } => {
                let l = match layout {
                    RopeLayout::AdjacentPairs => "adjacent",
                    RopeLayout::RotateHalf => "half",
                };
                format!("{k}_{l}_wg{wg}")
            }
            Variant::KvWrite { wg }
            | Variant::Attention { wg }
            | Variant::Swiglu { wg }
            | Variant::Add { wg }
            | Variant::Argmax { wg } => format!("{k}_wg{wg}"),
        }
    }

    /// A representative set of variants covering every template, format, strategy and layout,
    /// for validation tests.
    pub fn catalog() -> Vec<Variant> {
        let mut out = Vec::new();
        for weights in WeightFormat::ALL {
            out.push(Variant::Embed { weights, wg: 64 });
            for strategy in [Strategy::RowPerThread, Strategy::RowPerWorkgroup] {
                for x_window in [0, MAX_X_WINDOW] {
                    out.push(Variant::Matmul {
                        weights,
                        strategy,
                        wg: 64,
                        x_window,
                    });
                }
                out.push(Variant::Matvec {
                    weights,
                    strategy,
                    wg: 64,
                    x_window: 0,
                });
                out.push(Variant::Matvec {
                    weights,
                    strategy,
                    wg: 16,
                    x_window: 144,
                });
            }
        }
        for strategy in [Strategy::RowPerThread, Strategy::RowPerWorkgroup] {
            out.push(Variant::RmsNorm { strategy, wg: 64 });
        }
        for layout in [RopeLayout::AdjacentPairs, RopeLayout::RotateHalf] {
            out.push(Variant::Rope { layout, wg: 64 });
        }
        for (head_dim, group) in [(64, 3), (128, 4), (32, 1), (256, 2), (64, 8)] {
            for (splits, combine) in [(1, false), (16, false), (16, true)] {
                out.push(Variant::AttentionRpt {
                    wg: 8,
                    head_dim,
                    group,
                    splits,
                    combine,
                });
            }
        }
        for wg in [1, 8, 32, 64, 256] {
            out.push(Variant::Attention { wg });
            out.push(Variant::Argmax { wg });
            if wg != 64 {
                out.push(Variant::Matvec {
                    weights: WeightFormat::Q4_1,
                    strategy: Strategy::RowPerWorkgroup,
                    wg,
                    x_window: 0,
                });
            }
        }
        out.push(Variant::Matvec {
            weights: WeightFormat::Q8_0,
            strategy: Strategy::RowPerThread,
            wg: 16,
            x_window: MAX_X_WINDOW,
        });
        out.push(Variant::KvWrite { wg: 64 });
        out.push(Variant::Swiglu { wg: 64 });
        out.push(Variant::Add { wg: 64 });
        out
    }
}

/// The declaration of matvec's and matmul's x: storage, or a uniform of `x_window` vec4s.
fn x_decl(x_window: u32) -> String {
    match x_window {
        0 => "@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;".to_string(),
        n => format!("@group(0) @binding(2) var<uniform> x: array<vec4<f32>, {n}>;"),
    }
}

/// Renders the WGSL source of `variant`: its template with every placeholder filled.
///
/// `variant` should satisfy [`Variant::is_valid`]; other workgroup sizes render but do not
/// compile or reduce correctly.
pub fn render(variant: &Variant) -> String {
    let wg = variant.workgroup_size();
    let mut subs: Vec<(&str, String)> = vec![("{{WG}}", wg.to_string())];
    match *variant {
        Variant::Embed { weights, .. } => subs.push(("{{WEIGHTS}}", weights.decoder())),
        Variant::Matmul {
            weights, x_window, ..
        } => {
            subs.push(("{{WEIGHTS}}", weights.decoder()));
            subs.push(("{{X_DECL}}", x_decl(x_window)));
        }
        Variant::Matvec {
            weights, x_window, ..
        } => {
            subs.push(("{{WEIGHTS}}", weights.decoder()));
            subs.push(("{{X_DECL}}", x_decl(x_window)));
        }
        Variant::Rope { layout, .. } => subs.push((
            "{{ROPE_HALF}}",
            (layout == RopeLayout::RotateHalf).to_string(),
        )),
        Variant::Attention { wg } => {
            subs.push(("{{ACC}}", MAX_HEAD_DIM.div_ceil(wg.max(1)).to_string()))
        }
        Variant::AttentionRpt {
            head_dim,
            group,
            splits,
            ..
        } => {
            subs.push(("{{HD}}", head_dim.to_string()));
            subs.push(("{{GROUP}}", group.to_string()));
            subs.push(("{{SPLITS}}", splits.to_string()));
        }
        _ => {}
    }
    let mut src = variant.kernel().template().to_string();
    for (name, value) in subs {
        src = src.replace(name, &value);
    }
    src
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled_and_keys_are_unique() {
        let catalog = Variant::catalog();
        let mut keys = std::collections::HashSet::new();
        for v in &catalog {
            assert!(v.is_valid(), "{v:?}");
            let src = render(v);
            assert!(!src.contains("{{"), "{} leaves a placeholder", v.key());
            assert!(keys.insert(v.key()), "duplicate key {}", v.key());
        }
        // Every template is covered.
        for k in Kernel::ALL {
            assert!(catalog.iter().any(|v| v.kernel() == k), "{k:?} untested");
        }
    }
}

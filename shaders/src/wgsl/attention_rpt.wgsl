// Causal grouped-query attention for CPU drivers: the same contract as attention.wgsl (same
// parameters and bindings), but no workgroup memory and no barriers, which CPU drivers such as
// lavapipe run very slowly.
//
// One invocation per (token, KV head) computes all GROUP query heads that share the KV head,
// so every K and V value is loaded once for the whole group. It walks the positions
// 0..=p0+t once with an online softmax (running max, sum and accumulators per query head).
// HD (the head size) and GROUP (n_heads / n_kv_heads) are fixed in the shader, so the query
// vectors and accumulators are arrays with constant indices: registers, not scratch memory.

struct Params {
    n_tokens: u32,       // T
    n_heads: u32,        // n_kv_heads * GROUP
    n_kv_heads: u32,
    head_dim: u32,       // HD
    p0: u32,
    max_positions: u32,
    cache_offset: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
// The same buffers as attention.wgsl, bound as vec4s (CPU drivers load a vec4 in one go where
// four floats cost four loads): cache_offset must be a multiple of 4.
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;          // (T, n_heads, head_dim)
@group(0) @binding(2) var<storage, read> k_cache: array<vec4<f32>>;    // (n_kv_heads, max_positions, head_dim)
@group(0) @binding(3) var<storage, read> v_cache: array<vec4<f32>>;    // (n_kv_heads, max_positions, head_dim)
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;  // (T, n_heads, head_dim)

const WG: u32 = {{WG}}u;
const HD: u32 = {{HD}}u;
const HD4: u32 = HD / 4u;
const GROUP: u32 = {{GROUP}}u;
const NEG_BIG: f32 = -3.0e38;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    if idx >= params.n_tokens * params.n_kv_heads {
        return;
    }
    let t = idx / params.n_kv_heads;
    let kvh = idx % params.n_kv_heads;
    let n_pos = params.p0 + t + 1u;
    // Query heads kvh*GROUP .. kvh*GROUP+GROUP of token t, contiguous in q and out (indices
    // in vec4s from here on).
    let qb = (t * params.n_heads + kvh * GROUP) * HD4;
    let cb = params.cache_offset / 4u + kvh * params.max_positions * HD4;

    var qv: array<vec4<f32>, GROUP * HD4>;
    var acc: array<vec4<f32>, GROUP * HD4>;
    var m: array<f32, GROUP>;
    var l: array<f32, GROUP>;
    for (var g = 0u; g < GROUP; g++) {
        for (var i = 0u; i < HD4; i++) {
            qv[g * HD4 + i] = q[qb + g * HD4 + i] * params.scale;
            acc[g * HD4 + i] = vec4<f32>(0.0);
        }
        m[g] = NEG_BIG;
        l[g] = 0.0;
    }
    for (var j = 0u; j < n_pos; j++) {
        let kb = cb + j * HD4;
        // Zeroed explicitly: on SwiftShader (Chrome without a GPU) relying on the implicit
        // zero-initialisation of this loop-local array gave wrong sums.
        var s: array<f32, GROUP>;
        for (var g = 0u; g < GROUP; g++) {
            s[g] = 0.0;
        }
        for (var i = 0u; i < HD4; i++) {
            let kv = k_cache[kb + i];
            for (var g = 0u; g < GROUP; g++) {
                s[g] += dot(qv[g * HD4 + i], kv);
            }
        }
        var alpha: array<f32, GROUP>;
        var p: array<f32, GROUP>;
        for (var g = 0u; g < GROUP; g++) {
            let mn = max(m[g], s[g]);
            alpha[g] = exp(m[g] - mn);
            p[g] = exp(s[g] - mn);
            l[g] = l[g] * alpha[g] + p[g];
            m[g] = mn;
        }
        for (var i = 0u; i < HD4; i++) {
            let vv = v_cache[kb + i];
            for (var g = 0u; g < GROUP; g++) {
                acc[g * HD4 + i] = fma(vec4<f32>(p[g]), vv, acc[g * HD4 + i] * alpha[g]);
            }
        }
    }
    for (var g = 0u; g < GROUP; g++) {
        let inv = 1.0 / l[g];
        for (var i = 0u; i < HD4; i++) {
            out[qb + g * HD4 + i] = acc[g * HD4 + i] * inv;
        }
    }
}

// Split over positions (decode, where (token, KV head) pairs alone are too few to fill a CPU's
// SIMD lanes and cores): `split_pass` runs one invocation per (token, KV head, split s) over
// positions [s·S, s·S + S), S = ceil(n_pos / SPLITS), and writes per query head its running
// max m, sum l and unnormalised accumulators to `out`, used as the partials buffer:
// ((T, n_kv_heads, SPLITS, GROUP) records of HD4 + 1 vec4s, the last one (m, l, 0, 0)).
// `combine` then runs one invocation per (token, query head), reading the partials through `q`,
// and writes the normalised output to `out`.
const SPLITS: u32 = {{SPLITS}}u;
const RECORD: u32 = HD4 + 1u;

@compute @workgroup_size(WG)
fn split_pass(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    if idx >= params.n_tokens * params.n_kv_heads * SPLITS {
        return;
    }
    let s = idx % SPLITS;
    let tk = idx / SPLITS;  // t * n_kv_heads + kvh
    let t = tk / params.n_kv_heads;
    let kvh = tk % params.n_kv_heads;
    let n_pos = params.p0 + t + 1u;
    let per = (n_pos + SPLITS - 1u) / SPLITS;
    let j0 = min(s * per, n_pos);
    let j1 = min(j0 + per, n_pos);
    let qb = (t * params.n_heads + kvh * GROUP) * HD4;
    let cb = params.cache_offset / 4u + kvh * params.max_positions * HD4;

    var qv: array<vec4<f32>, GROUP * HD4>;
    var acc: array<vec4<f32>, GROUP * HD4>;
    var m: array<f32, GROUP>;
    var l: array<f32, GROUP>;
    // Every array is zeroed explicitly: SwiftShader does not re-zero a loop-local array on
    // each iteration as WGSL requires (see `main`).
    for (var g = 0u; g < GROUP; g++) {
        for (var i = 0u; i < HD4; i++) {
            qv[g * HD4 + i] = q[qb + g * HD4 + i] * params.scale;
            acc[g * HD4 + i] = vec4<f32>(0.0);
        }
        m[g] = NEG_BIG;
        l[g] = 0.0;
    }
    for (var j = j0; j < j1; j++) {
        let kb = cb + j * HD4;
        var sc: array<f32, GROUP>;
        for (var g = 0u; g < GROUP; g++) {
            sc[g] = 0.0;
        }
        for (var i = 0u; i < HD4; i++) {
            let kv = k_cache[kb + i];
            for (var g = 0u; g < GROUP; g++) {
                sc[g] += dot(qv[g * HD4 + i], kv);
            }
        }
        var alpha: array<f32, GROUP>;
        var p: array<f32, GROUP>;
        for (var g = 0u; g < GROUP; g++) {
            let mn = max(m[g], sc[g]);
            alpha[g] = exp(m[g] - mn);
            p[g] = exp(sc[g] - mn);
            l[g] = l[g] * alpha[g] + p[g];
            m[g] = mn;
        }
        for (var i = 0u; i < HD4; i++) {
            let vv = v_cache[kb + i];
            for (var g = 0u; g < GROUP; g++) {
                acc[g * HD4 + i] = fma(vec4<f32>(p[g]), vv, acc[g * HD4 + i] * alpha[g]);
            }
        }
    }
    let rb = idx * GROUP * RECORD;
    for (var g = 0u; g < GROUP; g++) {
        for (var i = 0u; i < HD4; i++) {
            out[rb + g * RECORD + i] = acc[g * HD4 + i];
        }
        out[rb + g * RECORD + HD4] = vec4<f32>(m[g], l[g], 0.0, 0.0);
    }
}

@compute @workgroup_size(WG)
fn combine(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    if idx >= params.n_tokens * params.n_heads {
        return;
    }
    let t = idx / params.n_heads;
    let h = idx % params.n_heads;
    let kvh = h / GROUP;
    let g = h % GROUP;
    // Record of split s: (((t * n_kv_heads + kvh) * SPLITS + s) * GROUP + g) * RECORD.
    let r0 = ((t * params.n_kv_heads + kvh) * SPLITS * GROUP + g) * RECORD;
    let step = GROUP * RECORD;
    var mx = NEG_BIG;
    for (var s = 0u; s < SPLITS; s++) {
        mx = max(mx, q[r0 + s * step + HD4].x);
    }
    var l = 0.0;
    for (var s = 0u; s < SPLITS; s++) {
        let ml = q[r0 + s * step + HD4];
        l += exp(ml.x - mx) * ml.y;
    }
    let inv = 1.0 / l;
    for (var i = 0u; i < HD4; i++) {
        var o = vec4<f32>(0.0);
        for (var s = 0u; s < SPLITS; s++) {
            let w = exp(q[r0 + s * step + HD4].x - mx);
            o = fma(vec4<f32>(w), q[r0 + s * step + i], o);
        }
        out[idx * HD4 + i] = o * inv;
    }
}

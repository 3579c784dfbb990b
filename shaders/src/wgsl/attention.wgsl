// Causal attention with grouped-query heads over a KV cache, for T new tokens at p0..p0+T.
//
// q and out are (T, n_heads, head_dim); the caches are (n_kv_heads, max_positions, head_dim)
// from cache_offset and already hold the new tokens' K/V. Query head h reads KV head
// h / (n_heads / n_kv_heads); token t attends to positions 0..=p0+t with scale 1/sqrt(head_dim)
// (passed in `scale`).
// One workgroup per (token, head). Positions go in chunks of WG: each invocation scores one
// position into workgroup memory, then every invocation folds the chunk into a running
// (max, sum, accumulator) softmax (online softmax) for the output dimensions it owns
// (d = lid + a*WG, a < ACC). So workgroup memory stays WG floats for any context length.

struct Params {
    n_tokens: u32,       // T
    n_heads: u32,
    n_kv_heads: u32,     // divides n_heads
    head_dim: u32,       // at most ACC * WG
    p0: u32,
    max_positions: u32,
    cache_offset: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;          // (T, n_heads, head_dim)
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;    // (n_kv_heads, max_positions, head_dim)
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;    // (n_kv_heads, max_positions, head_dim)
@group(0) @binding(4) var<storage, read_write> out: array<f32>;  // (T, n_heads, head_dim)

const WG: u32 = {{WG}}u;
const ACC: u32 = {{ACC}}u;
const NEG_BIG: f32 = -3.0e38;

var<workgroup> scores: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = wid.x + wid.y * nwg.x;
    // Uniform across the workgroup, like every loop bound below, so barriers stay legal.
    if idx >= params.n_tokens * params.n_heads {
        return;
    }
    let hd = params.head_dim;
    let t = idx / params.n_heads;
    let h = idx % params.n_heads;
    let kvh = h / (params.n_heads / params.n_kv_heads);
    let n_pos = params.p0 + t + 1u;
    let qb = idx * hd;
    let cb = params.cache_offset + kvh * params.max_positions * hd;

    var m = NEG_BIG;
    var l = 0.0;
    var acc: array<f32, ACC>;
    for (var c = 0u; c < n_pos; c += WG) {
        let j = c + lid;
        var s = NEG_BIG;
        if j < n_pos {
            var dot = 0.0;
            let kb = cb + j * hd;
            for (var d = 0u; d < hd; d++) {
                dot = fma(q[qb + d], k_cache[kb + d], dot);
            }
            s = dot * params.scale;
        }
        scores[lid] = s;
        workgroupBarrier();
        let count = min(WG, n_pos - c);
        var cm = m;
        for (var i = 0u; i < count; i++) {
            cm = max(cm, scores[i]);
        }
        let alpha = exp(m - cm);
        l *= alpha;
        for (var a = 0u; a < ACC; a++) {
            acc[a] *= alpha;
        }
        for (var i = 0u; i < count; i++) {
            let p = exp(scores[i] - cm);
            l += p;
            let vb = cb + (c + i) * hd;
            for (var a = 0u; a < ACC; a++) {
                let d = lid + a * WG;
                if d < hd {
                    acc[a] = fma(p, v_cache[vb + d], acc[a]);
                }
            }
        }
        m = cm;
        workgroupBarrier();
    }
    let inv = 1.0 / l;
    for (var a = 0u; a < ACC; a++) {
        let d = lid + a * WG;
        if d < hd {
            out[qb + d] = acc[a] * inv;
        }
    }
}

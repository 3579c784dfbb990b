// Appends the K and V rows of T new tokens to a sequence's KV cache at positions p0..p0+T.
// New rows are (T, n_kv_heads, head_dim); each cache is (n_kv_heads, max_positions, head_dim)
// starting at cache_offset (so one buffer may hold several layers or sequences).

struct Params {
    n_tokens: u32,       // T
    n_kv_heads: u32,
    head_dim: u32,
    max_positions: u32,
    p0: u32,             // position of the first new token
    cache_offset: u32,   // first element of this layer's cache
    src_offset: u32,     // first element of the new K rows
    v_src_offset: u32,   // first element of the new V rows (K and V may share a buffer)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> k_new: array<f32>;             // (T, n_kv_heads, head_dim)
@group(0) @binding(2) var<storage, read> v_new: array<f32>;             // (T, n_kv_heads, head_dim)
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;     // (n_kv_heads, max_positions, head_dim)
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;     // (n_kv_heads, max_positions, head_dim)

const WG: u32 = {{WG}}u;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    let hd = params.head_dim;
    if idx >= params.n_tokens * params.n_kv_heads * hd {
        return;
    }
    let d = idx % hd;
    let h = (idx / hd) % params.n_kv_heads;
    let t = idx / (hd * params.n_kv_heads);
    let dst = params.cache_offset + (h * params.max_positions + params.p0 + t) * hd + d;
    k_cache[dst] = k_new[params.src_offset + idx];
    v_cache[dst] = v_new[params.v_src_offset + idx];
}

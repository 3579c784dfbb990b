// Rotary position embedding, in place, on x of shape (T, n_heads, head_dim) at given positions.
//
// The angles come from a host-built table cos_sin[(pos, i)] = (cos, sin)(pos * base^(-2i/head_dim))
// of shape (max_positions, head_dim/2): Vulkan only promises 2^-11 absolute error for sin/cos,
// too coarse for a 1e-5 match with the CPU oracle, and a table costs one read per pair.
// Pair layout (ROTATE_HALF): false rotates adjacent pairs (2i, 2i+1) as in llama GGUF files;
// true rotates (i, i + head_dim/2) ("rotate half") as in Hugging Face checkpoints.

struct Params {
    n_tokens: u32,   // T
    n_heads: u32,
    head_dim: u32,   // even
    x_offset: u32,   // first element of x
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;       // (T,)
@group(0) @binding(2) var<storage, read> cos_sin: array<vec2<f32>>;   // (max_positions, head_dim/2)
@group(0) @binding(3) var<storage, read_write> x: array<f32>;         // (T, n_heads, head_dim)

const WG: u32 = {{WG}}u;
const ROTATE_HALF: bool = {{ROPE_HALF}};

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let half = params.head_dim / 2u;
    let idx = gid.x + gid.y * nwg.x * WG;
    if idx >= params.n_tokens * params.n_heads * half {
        return;
    }
    let i = idx % half;
    let th = idx / half;  // token * n_heads + head
    let t = th / params.n_heads;
    let cs = cos_sin[positions[t] * half + i];
    let base = params.x_offset + th * params.head_dim;
    var a: u32;
    var b: u32;
    if ROTATE_HALF {
        a = base + i;
        b = base + i + half;
    } else {
        a = base + 2u * i;
        b = a + 1u;
    }
    let x0 = x[a];
    let x1 = x[b];
    x[a] = x0 * cs.x - x1 * cs.y;
    x[b] = x0 * cs.y + x1 * cs.x;
}

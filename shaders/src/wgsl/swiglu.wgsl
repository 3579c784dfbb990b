// SwiGLU gate of the feed-forward block: out[i] = silu(gate[i]) * up[up_offset + i],
// silu(g) = g / (1 + e^-g).

struct Params {
    n: u32,
    up_offset: u32,  // element of `up` that pairs with gate[0] (gate and up may share a buffer)
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = {{WG}}u;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= params.n {
        return;
    }
    let g = gate[i];
    out[i] = g / (1.0 + exp(-g)) * up[params.up_offset + i];
}

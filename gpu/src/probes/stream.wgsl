// Adapter probe: streaming read bandwidth. Each invocation sums its own contiguous run of
// `per_thread` vec4s, the access pattern of the row-per-thread matvec, and writes one float
// (so the reads cannot be optimised away). Bytes read / time is the bound for memory-bound
// kernels on this adapter.

struct Params {
    threads: u32,
    per_thread: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;     // (threads, per_thread)
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;     // (threads,)

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if t >= params.threads {
        return;
    }
    let base = t * params.per_thread;
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    for (var i = 0u; i < params.per_thread; i += 2u) {
        a += src[base + i];
        b += src[base + i + 1u];
    }
    let s = a + b;
    dst[t] = s.x + s.y + s.z + s.w;
}
